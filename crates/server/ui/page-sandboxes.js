// The sandboxes: the user's own or everyone's, filtered by state and owner (the filters are
// in the URL, so a filtered list can be shared), refreshed every few seconds.

import { get, path, post } from './api.js';
import { badge, copyButton, empty, errorBox, fill, h, loading, messageBox, plural, PROBLEM, shortSha, table, timeEl } from './dom.js';
import { session } from './session.js';

const STATES = ['deploying', 'ready', 'failed', 'sleeping', 'expired', 'deleted'];
const ENDED = new Set(['expired', 'deleted']);
const LIMIT = 100;

export default function sandboxesPage(root, ctx) {
  ctx.title('Sandboxes');
  const q = ctx.query;
  let scope = q.get('scope') === 'all' ? 'all' : 'mine';
  let state = q.get('state') || '';
  let owner = q.get('owner') || '';

  const scopeRadio = (value, label) => h('label', { class: 'seg' },
    h('input', { type: 'radio', name: 'scope', value, checked: scope === value }), label);
  const stateSelect = h('select', { id: 'filter-state', 'aria-label': 'State' },
    h('option', { value: '', text: 'Live' }),
    h('option', { value: 'any', text: 'Any state' }),
    STATES.map((s) => h('option', { value: s, text: s })));
  stateSelect.value = STATES.includes(state) || state === 'any' ? state : '';
  const ownerInput = h('input', { id: 'filter-owner', type: 'search', placeholder: 'Owner', 'aria-label': 'Owner', value: owner, autocomplete: 'off' });
  const ownerLabel = h('label', { class: 'inline', hidden: scope !== 'all' }, 'Owner', ownerInput);
  const filters = h('form', { id: 'sandbox-filters', class: 'filters', role: 'search', onsubmit: (e) => e.preventDefault() },
    h('fieldset', { class: 'segmented' }, h('legend', { class: 'sr', text: 'Whose sandboxes' }),
      scopeRadio('mine', 'Mine'), scopeRadio('all', "Everyone's")),
    h('label', { class: 'inline' }, 'State', stateSelect),
    ownerLabel);
  const list = h('div', { id: 'sandboxes', class: 'table-wrap' }, loading('Loading sandboxes…'));
  const actionError = messageBox('error', { id: 'sandbox-error', role: 'alert' });
  root.append(
    h('div', { class: 'page-head' }, h('h1', null, 'Sandboxes'), h('a', { href: '/new', class: 'button primary' }, 'New sandbox')),
    filters, actionError.el, list);

  let lastJson = '';
  let seq = 0;
  const load = async () => {
    const mine = ++seq;
    const params = new URLSearchParams({ limit: String(LIMIT) });
    const who = scope === 'mine' ? session.user : owner.trim();
    if (who) params.set('owner', who);
    if (STATES.includes(state)) params.set('state', state);
    let page;
    try {
      page = await get(`/api/sandboxes?${params}`);
    } catch (e) {
      if (ctx.signal.aborted || mine !== seq || e.status === 401) return;
      lastJson = '';
      fill(list, errorBox(e.message));
      return;
    }
    if (ctx.signal.aborted || mine !== seq) return;
    const json = JSON.stringify(page);
    // Unchanged: the DOM (and the focus in it) stays as it is.
    if (json === lastJson) return;
    lastJson = json;
    let items = Array.isArray(page.items) ? page.items : [];
    if (!state) items = items.filter((s) => !ENDED.has(s.state));
    render(items, Boolean(page.next));
  };

  const render = (items, more) => {
    if (!items.length) {
      const filtered = state || (scope === 'all' && owner);
      fill(list, empty(
        filtered ? 'No sandbox matches these filters' : scope === 'mine' ? 'You have no live sandbox' : 'There is no live sandbox',
        filtered ? 'Change the state or the owner above.' : 'A sandbox runs branches of services next to the shared environment.',
        h('a', { href: '/new', class: 'button primary' }, 'Create a sandbox')));
      return;
    }
    const rows = items.map((s) => {
      const live = !ENDED.has(s.state);
      const url = String(s.url || '');
      const services = (s.services || []).map((v) => {
        const st = String(v.state || '');
        const restarts = v.restarts > 0 ? ` (${plural(v.restarts, 'restart', 'restarts')})` : '';
        return h('div', { class: 'svc' },
          h('code', { text: `${v.service}@${v.branch}` }),
          v.commit ? h('code', { class: 'muted sha', title: v.commit, text: shortSha(v.commit) }) : null,
          h('span', { class: PROBLEM.has(st) ? 'problem' : 'muted', 'data-service-state': st, text: st + restarts }));
      });
      const actions = [];
      if (live && s.state === 'sleeping' && session.owns(s.owner)) {
        const wake = h('button', { type: 'button', class: 'small', 'data-action': 'wake', text: 'Wake' });
        wake.addEventListener('click', async () => {
          wake.disabled = true;
          actionError.set('');
          try {
            await post(path('/api/sandboxes', s.name, 'wake'));
            lastJson = '';
            load();
          } catch (e) {
            if (e.status !== 401) actionError.set(e.message);
          } finally {
            wake.disabled = false;
          }
        });
        actions.push(wake);
      }
      return h('tr', { 'data-sandbox': s.name },
        h('td', null, h('a', { href: `/sandboxes/${encodeURIComponent(s.name)}`, class: 'strong', 'data-sandbox-link': s.name, text: s.name })),
        h('td', { 'data-sandbox-state': s.state }, badge(s.state)),
        h('td', null, services.length ? services : h('span', { class: 'muted', text: '—' })),
        h('td', null, live ? timeEl(s.expires_at) : h('span', { class: 'muted', text: '—' }),
          live && s.expires_soon ? h('span', { class: 'badge busy soon', 'data-expires-soon': '', title: 'Extend it, or it is deleted when it expires', text: 'expires soon' }) : null),
        h('td', { text: s.owner || '' }),
        h('td', { class: 'url-cell' }, live && /^https?:\/\//.test(url)
          ? [h('a', { href: url, target: '_blank', rel: 'noopener', text: url }), ' ', copyButton(url, `Copy the URL of ${s.name}`)]
          : h('span', { class: 'muted', text: '—' })),
        h('td', null, actions));
    });
    fill(list,
      table(['Name', 'State', 'Services', 'Expires', 'Owner', 'URL', ''], rows),
      more ? h('p', { class: 'muted', text: `Showing the ${LIMIT} most recent; narrow the list with the filters.` }) : null);
  };

  const changed = () => {
    ctx.setQuery({ scope: scope === 'all' ? 'all' : '', state, owner: scope === 'all' ? owner.trim() : '' });
    ownerLabel.hidden = scope !== 'all';
    lastJson = '';
    fill(list, loading('Loading sandboxes…'));
    load();
  };
  filters.addEventListener('change', (e) => {
    if (e.target.name === 'scope') scope = e.target.value;
    if (e.target === stateSelect) state = stateSelect.value;
    changed();
  });
  let typing = null;
  ownerInput.addEventListener('input', () => {
    owner = ownerInput.value;
    clearTimeout(typing);
    typing = setTimeout(changed, 300);
  });
  ctx.onCleanup(() => clearTimeout(typing));

  load();
  ctx.every(5000, load);
}
