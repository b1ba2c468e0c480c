// The delivery log: every push webhook delivery and polling trigger of the last 7 days,
// whether its signature held, what it named and what it did (or why nothing). It is where a
// user looks when a push did not redeploy their sandbox.

import { get } from './api.js';
import { badge, empty, errorBox, fill, h, loading, shortSha, table, timeEl } from './dom.js';

const PAGE = 50;

export default function hooksPage(root, ctx) {
  ctx.title('Deliveries');
  const list = h('div', { id: 'deliveries', class: 'table-wrap' }, loading('Loading deliveries…'));
  const more = h('button', { type: 'button', id: 'deliveries-more', class: 'small', hidden: true }, 'Older');
  root.append(h('div', { class: 'page-head' }, h('h1', null, 'Deliveries')),
    h('p', { class: 'muted', text: 'Push webhooks from Bitbucket (POST /api/hooks/bitbucket) and polling of followed branches, newest first, kept 7 days. A delivery that did not redeploy says why.' }),
    list, more);

  let items = [];
  let next = null;
  let last = '';

  const render = () => {
    if (!items.length) {
      fill(list, empty('No delivery yet', "Point a Bitbucket push webhook at this server's /api/hooks/bitbucket with the shared secret, or turn polling on."));
      return;
    }
    const rows = items.map((d) => h('tr', { 'data-delivery': d.id, 'data-signature': d.signature },
      h('td', null, timeEl(d.received_at)),
      h('td', { text: d.source === 'poll' ? 'poll' : (d.event || 'webhook') }),
      h('td', null, h('code', { text: d.repository || '—' }),
        d.services && d.services.length ? h('div', { class: 'muted small-text', text: d.services.join(', ') }) : null),
      h('td', null, (d.refs || []).map((r) => h('div', null, h('code', { text: r.branch }), ' ',
        h('span', { class: 'muted', text: r.change === 'delete' ? 'deleted' : shortSha(r.commit, 7) })))),
      h('td', null, badge(d.signature)),
      h('td', { 'data-outcome': '', text: d.outcome }),
      h('td', null, h('code', { class: 'muted', text: d.delivery_id || '' }))));
    fill(list, table(['Received', 'Event', 'Repository', 'Refs', 'Signature', 'What it did', 'Delivery id'], rows));
    more.hidden = !next;
  };

  const load = async () => {
    let page;
    try {
      page = await get(`/api/hooks/deliveries?limit=${PAGE}`);
    } catch (e) {
      if (!ctx.signal.aborted && e.status !== 401) fill(list, errorBox(e.message));
      return;
    }
    if (ctx.signal.aborted) return;
    const json = JSON.stringify(page.items);
    // The first page is read again on a timer; older pages the user asked for stay.
    if (json === last) return;
    last = json;
    items = page.items || [];
    next = page.next;
    render();
  };

  more.addEventListener('click', async () => {
    if (!next) return;
    more.disabled = true;
    try {
      const page = await get(`/api/hooks/deliveries?limit=${PAGE}&cursor=${encodeURIComponent(next)}`);
      if (ctx.signal.aborted) return;
      items = items.concat(page.items || []);
      next = page.next;
      render();
    } catch (e) {
      if (!ctx.signal.aborted && e.status !== 401) fill(list, errorBox(e.message));
    } finally {
      more.disabled = false;
    }
  });

  load();
  ctx.every(10000, load);
}
