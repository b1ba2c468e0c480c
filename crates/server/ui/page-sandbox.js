// A sandbox: its services (branch, commit, state, upstream), how to reach it (its URL and
// ready-to-paste curl lines), what its owner can do (extend, redeploy with the branches'
// newest commits, wake, delete), its deployments, its services' live runtime log, the
// router's recent decisions for it and its history.

import { get, path, patch, post, del } from './api.js';
import { badge, copyButton, empty, errorBox, fill, fmtDuration, fmtTime, h, loading, messageBox, plural, PROBLEM, shortSha, shq, table, timeEl } from './dom.js';
import { follow } from './follow.js';
import { frameLine, logToolbar } from './logtools.js';
import { LogView } from './logview.js';
import { session } from './session.js';

const ENDED = new Set(['expired', 'deleted']);
const TTLS = [['1h', '1 hour'], ['8h', '8 hours'], ['24h', '1 day'], ['72h', '3 days'], ['168h', '1 week']];
const STREAMS = [['stdout', 'stdout'], ['stderr', 'stderr'], ['system', 'system'], ['instance', 'states']];
const RUNTIME_KEPT = 2000;
const RUNTIME_TAIL = 200;
const HISTORY_SHOWN = 50;

export default function sandboxPage(root, ctx) {
  const name = ctx.params.name;
  ctx.title(`Sandbox ${name}`);
  const stateEl = h('span', { id: 'sv-state' });
  const summary = h('p', { id: 'sv-summary', class: 'muted' });
  const actions = h('div', { id: 'sv-actions', class: 'actions' });
  const error = messageBox('error', { id: 'sv-error', role: 'alert' });
  const status = messageBox('muted', { id: 'sv-status', role: 'status' });
  const reach = h('div', { id: 'sv-reach' }, loading());
  const services = h('div', { id: 'sv-services', class: 'table-wrap' }, loading());
  const deployments = h('div', { id: 'sv-deployments', class: 'table-wrap' }, loading());
  const history = h('div', { id: 'sv-history', class: 'table-wrap' }, loading());
  const requests = h('div', { id: 'requests', class: 'table-wrap' }, loading());
  const view = new LogView({ id: 'rt-lines', label: 'Runtime log', max: RUNTIME_KEPT, times: true });
  const tools = logToolbar(view, { idPrefix: 'rt', streams: STREAMS });
  const rtStatus = h('p', { id: 'rt-status', class: 'muted', role: 'status' }, 'Connecting…');
  const refreshRequests = h('button', { type: 'button', id: 'requests-refresh', class: 'small' }, 'Refresh');
  const card = (id, title, ...body) => h('section', { class: 'card', 'aria-labelledby': id }, h('h2', { id }, title), ...body);

  const dialog = h('dialog', { id: 'confirm-dialog', 'aria-labelledby': 'confirm-title' });
  root.append(
    h('div', { class: 'page-head' }, h('h1', { id: 'sv-title' }, h('span', { class: 'muted' }, 'Sandbox '), name), stateEl),
    summary, actions, error.el, status.el,
    h('div', { class: 'grid-2' },
      card('sv-reach-title', 'Reach it', reach),
      card('sv-services-title', 'Services', services)),
    h('section', { class: 'card', 'aria-labelledby': 'rt-title' },
      h('div', { class: 'section-head' }, h('h2', { id: 'rt-title' }, 'Runtime log'),
        h('span', { class: 'muted', text: `The services' output since they started: the last ${RUNTIME_TAIL} lines, then live.` })),
      tools.el, rtStatus, view.el),
    h('div', { class: 'grid-2' },
      card('sv-deployments-title', 'Deployments', deployments),
      h('section', { class: 'card', 'aria-labelledby': 'requests-title' },
        h('div', { class: 'section-head' }, h('h2', { id: 'requests-title' }, 'Requests'), refreshRequests),
        h('p', { class: 'muted small-text', text: "The router's last decisions for this sandbox, newest first. A request you expected here but is missing, or went to the baseline, lost its routing key on the way." }),
        requests)),
    card('sv-history-title', 'History', history),
    dialog);

  let sandbox = null;
  let catalog = null;
  let sandboxJson = '';
  let historyJson = '';
  let deploymentsJson = '';

  const act = async (button, work) => {
    button.disabled = true;
    error.set('');
    status.set('');
    try {
      await work();
    } catch (e) {
      if (!ctx.signal.aborted && e.status !== 401) error.set(e.message);
    } finally {
      button.disabled = false;
    }
  };

  const confirmDelete = () => {
    const cancel = h('button', { type: 'button', id: 'confirm-cancel', text: 'Cancel' });
    const ok = h('button', { type: 'button', id: 'confirm-delete', class: 'danger', text: `Delete ${name}` });
    fill(dialog,
      h('h2', { id: 'confirm-title', text: `Delete sandbox ${name}?` }),
      h('p', { text: 'Its services are stopped, its routes dropped and its checkouts deleted. This cannot be undone.' }),
      h('div', { class: 'form-actions' }, ok, cancel));
    cancel.addEventListener('click', () => dialog.close());
    ok.addEventListener('click', () => {
      dialog.close();
      act(ok, async () => {
        status.set(`Deleting ${name}…`);
        await del(path('/api/sandboxes', name));
        status.set(`Sandbox ${name} is being deleted.`);
        sandboxJson = '';
        refresh();
      });
    });
    dialog.showModal();
    cancel.focus();
  };

  const renderActions = () => {
    const live = !ENDED.has(sandbox.state);
    if (!live || !session.owns(sandbox.owner)) {
      fill(actions, live ? h('span', { class: 'muted', text: `Only ${sandbox.owner} can change this sandbox.` }) : '');
      return;
    }
    const ttl = h('select', { id: 'extend-ttl', 'aria-label': 'Extend by' }, TTLS.map(([v, t]) => h('option', { value: v, text: t })));
    ttl.value = '24h';
    const extend = h('button', { type: 'button', 'data-action': 'extend', text: 'Extend' });
    extend.addEventListener('click', () => act(extend, async () => {
      const sb = await post(path('/api/sandboxes', name, 'extend'), { ttl: ttl.value });
      status.set(`Extended: it now expires ${fmtTime(sb.expires_at)}.`);
      sandboxJson = '';
      refresh();
    }));
    const redeploy = h('button', { type: 'button', 'data-action': 'redeploy', text: 'Redeploy', title: "Deploy each service's branch again, at its newest commit" });
    redeploy.addEventListener('click', () => act(redeploy, async () => {
      const selections = (sandbox.services || []).map((s) => ({ service: s.service, branch: s.branch }));
      const accepted = await post(path('/api/sandboxes', name, 'deploy'), { services: selections });
      const dep = accepted && accepted.deployment;
      if (dep && dep.id) ctx.navigate(`/deployments/${encodeURIComponent(dep.id)}`);
    }));
    const wake = sandbox.state === 'sleeping' ? h('button', { type: 'button', 'data-action': 'wake', text: 'Wake' }) : null;
    if (wake) {
      wake.addEventListener('click', () => act(wake, async () => {
        await post(path('/api/sandboxes', name, 'wake'));
        status.set('Waking it: its services start again from their builds.');
        sandboxJson = '';
        refresh();
      }));
    }
    const remove = h('button', { type: 'button', class: 'danger', 'data-action': 'delete', text: 'Delete…' });
    remove.addEventListener('click', confirmDelete);
    fill(actions, h('span', { class: 'extend' }, ttl, extend), redeploy, wake, remove);
  };

  const renderReach = () => {
    const url = String(sandbox.url || '');
    if (ENDED.has(sandbox.state) || !/^https?:\/\//.test(url)) {
      fill(reach, h('p', { class: 'muted', text: 'The sandbox has ended: nothing routes to it.' }));
      return;
    }
    const first = (sandbox.services || [])
      .map((s) => catalog && catalog.find((c) => c.name === s.service))
      .find((c) => c && c.routes && c.routes.length);
    const route = first ? first.routes[0] : '/';
    const base = url.replace(/\/$/, '');
    const lines = [['curl-host', 'By its host name (browsers too)', `curl ${shq(base + route)}`]];
    if (session.gatewayUrl) {
      const gateway = session.gatewayUrl.replace(/\/$/, '');
      lines.push(['curl-header', 'By a header, through the router', `curl -H ${shq(`X-SDP-Sandbox: ${name}`)} ${shq(gateway + route)}`]);
    }
    fill(reach,
      h('p', { class: 'url-line' }, h('a', { id: 'sv-url', href: url, target: '_blank', rel: 'noopener', text: url }), ' ', copyButton(url, 'Copy the URL')),
      lines.map(([id, label, text]) => h('div', { class: 'curl' },
        h('span', { class: 'muted small-text', text: label }),
        h('div', { class: 'curl-line' }, h('code', { id, text }), copyButton(text, `Copy: ${label}`)))),
      h('p', { class: 'muted small-text', text: 'Requests for the services it runs go to the sandbox; the others go on to the shared environment.' }));
  };

  // Following a branch: each push redeploys the service. Only its owner changes it.
  const followToggle = (v) => {
    const mine = !ENDED.has(sandbox.state) && session.owns(sandbox.owner);
    const box = h('input', {
      type: 'checkbox', 'data-follow': v.service, checked: !!v.follow, disabled: !mine,
      'aria-label': `Follow ${v.branch} of ${v.service}: redeploy it on every push`,
      title: mine ? 'Redeploy on every push to the branch' : `Only ${sandbox.owner} can change this`,
    });
    box.addEventListener('change', () => act(box, async () => {
      const sb = await patch(path('/api/sandboxes', name, 'services', v.service), { follow: box.checked });
      status.set(box.checked ? `${v.service} follows ${v.branch}: each push redeploys it.` : `${v.service} no longer follows ${v.branch}.`);
      sandbox = sb;
      sandboxJson = '';
      refresh();
    }));
    return h('label', { class: 'follow' }, box, h('span', { class: 'sr', text: 'Follow' }));
  };

  const renderServices = () => {
    const list = Array.isArray(sandbox.services) ? sandbox.services : [];
    // A refresh must not fold what the user unfolded.
    const open = new Set([...services.querySelectorAll('details[open]')].map((d) => d.dataset.lastLines));
    if (!list.length) {
      fill(services, empty('No services', 'This sandbox runs nothing.'));
      return;
    }
    const rows = list.map((v) => {
      const st = String(v.state || '');
      const restarts = typeof v.restarts === 'number' ? v.restarts : 0;
      const lines = Array.isArray(v.last_lines) ? v.last_lines : [];
      const cell = [badge(st),
        v.reason ? [' ', h('span', { class: PROBLEM.has(st) ? 'problem' : 'muted', 'data-reason': '', text: String(v.reason) })] : null,
        restarts > 0 ? [' ', h('span', { class: 'muted', 'data-restarts': restarts, text: `(${plural(restarts, 'restart', 'restarts')})` })] : null];
      if (lines.length) {
        cell.push(h('details', { class: 'last-lines', 'data-last-lines': v.service, open: open.has(v.service) },
          h('summary', { text: `${st === 'crashed' ? 'Last lines before it crashed' : 'Last lines'} (${lines.length})` }),
          h('pre', { text: lines.join('\n') })));
      }
      // A commit of the followed branch that waits, and why: "log in to deploy it".
      const pending = v.pending && v.pending.commit
        ? h('div', { class: 'pending', 'data-pending': v.service, role: 'note',
          text: `new commit ${shortSha(v.pending.commit, 7)} waiting: ${v.pending.reason || ''}` })
        : null;
      return h('tr', { 'data-view-service': v.service, 'data-service-state': st },
        h('td', null, h('strong', { text: v.service })),
        h('td', null, h('code', { text: v.branch || '' }), pending),
        h('td', null, h('code', { title: v.commit || '', text: shortSha(v.commit) || '—' })),
        h('td', { class: PROBLEM.has(st) ? 'problem' : '' }, cell),
        h('td', null, h('code', { text: v.upstream || '—' })),
        h('td', null, followToggle(v)));
    });
    fill(services, table(['Service', 'Branch', 'Commit', 'State', 'Upstream', 'Follow'], rows, { 'aria-labelledby': 'sv-services-title' }));
  };

  const renderSandbox = () => {
    fill(stateEl, badge(sandbox.state, { 'data-view-state': sandbox.state }));
    const live = !ENDED.has(sandbox.state);
    fill(summary,
      'Owner ', h('strong', { text: sandbox.owner }), ' · created ', timeEl(sandbox.created_at),
      live ? [' · expires ', timeEl(sandbox.expires_at, { id: 'sv-expires' })] : null,
      live && sandbox.expires_soon ? [' ', h('span', { class: 'badge busy soon', 'data-expires-soon': '', text: 'expires soon' })] : null);
    renderActions();
    renderReach();
    renderServices();
    tools.setServices((sandbox.services || []).map((s) => s.service));
  };

  const renderDeployments = (items) => {
    if (!items.length) {
      fill(deployments, empty('No deployments', ''));
      return;
    }
    const rows = items.map((d) => {
      const took = d.finished_at ? new Date(d.finished_at) - new Date(d.created_at) : NaN;
      return h('tr', { 'data-deployment': d.id },
        h('td', null, h('a', { href: `/deployments/${encodeURIComponent(d.id)}`, text: d.id })),
        h('td', null, badge(d.state)),
        h('td', { text: (d.services || []).map((s) => `${s.service}@${s.branch}`).join(', ') }),
        h('td', { text: d.requested_by }),
        h('td', null, timeEl(d.created_at)),
        h('td', { text: isNaN(took) ? '' : fmtDuration(took) }));
    });
    fill(deployments, table(['Deployment', 'State', 'Branches', 'By', 'Started', 'Took'], rows, { 'aria-labelledby': 'sv-deployments-title' }));
  };

  const renderHistory = (list) => {
    if (!list.length) {
      fill(history, empty('Nothing recorded yet', ''));
      return;
    }
    const newest = list.slice(-HISTORY_SHOWN).reverse();
    const rows = newest.map((e) => h('tr', { 'data-history-action': e.action || '' },
      h('td', null, timeEl(e.at)),
      h('td', { text: e.actor || '' }),
      h('td', null, h('code', { text: e.action || '' })),
      h('td', { text: e.detail || '' })));
    fill(history,
      table(['When', 'Who', 'What', 'Detail'], rows, { 'aria-labelledby': 'sv-history-title' }),
      list.length > HISTORY_SHOWN ? h('p', { class: 'muted', text: `The ${HISTORY_SHOWN} most recent of ${list.length} entries.` }) : null);
  };

  const showRequests = async () => {
    try {
      const list = await get(path('/api/sandboxes', name, 'requests'));
      if (ctx.signal.aborted) return;
      if (!Array.isArray(list) || !list.length) {
        fill(requests, empty('No request has named this sandbox yet', 'Send one with a curl line above.'));
        return;
      }
      fill(requests, table(['When', 'Method', 'Path', 'Service', 'Route', 'Upstream', 'Status', 'ms'], list.map((d) => h('tr', { 'data-route': d.route },
        h('td', null, timeEl(d.time)),
        h('td', { text: d.method || '' }),
        h('td', null, h('code', { text: d.path || '' })),
        h('td', { text: d.service || '—' }),
        h('td', null, badge(d.route === 'sandbox' ? 'sandbox' : d.route, { class: `badge ${d.route === 'sandbox' ? 'ok' : 'plain'}` })),
        h('td', null, h('code', { text: d.upstream || '—' })),
        h('td', { text: String(d.status) }),
        h('td', { text: typeof d.duration_ms === 'number' ? d.duration_ms.toFixed(1) : '' })))));
    } catch (e) {
      if (!ctx.signal.aborted && e.status !== 401) fill(requests, errorBox(e.message));
    }
  };
  refreshRequests.addEventListener('click', showRequests);

  let seq = 0;
  const refresh = async () => {
    const mine = ++seq;
    let sb;
    try {
      sb = await get(path('/api/sandboxes', name));
    } catch (e) {
      if (ctx.signal.aborted || e.status === 401 || mine !== seq) return;
      sandboxJson = '';
      if (e.status === 404) {
        fill(root, h('h1', null, 'No such sandbox'), empty(`There is no sandbox ${name}`, 'It may have been deleted, or the link is mistyped.', h('a', { href: '/sandboxes', class: 'button' }, 'All sandboxes')));
        socket.close();
        return;
      }
      fill(services, errorBox(e.message));
      return;
    }
    if (ctx.signal.aborted || mine !== seq) return;
    const json = JSON.stringify(sb) + session.user;
    if (json !== sandboxJson) {
      sandboxJson = json;
      sandbox = sb;
      renderSandbox();
    }
    const [hist, deps] = await Promise.allSettled([
      get(path('/api/sandboxes', name, 'history')),
      get(`${path('/api/sandboxes', name, 'deployments')}?limit=20`),
    ]);
    if (ctx.signal.aborted || mine !== seq) return;
    if (hist.status === 'fulfilled') {
      const j = JSON.stringify(hist.value);
      if (j !== historyJson) {
        historyJson = j;
        renderHistory(Array.isArray(hist.value) ? hist.value : []);
      }
    } else if (hist.reason.status !== 401) {
      historyJson = '';
      fill(history, errorBox(hist.reason.message));
    }
    if (deps.status === 'fulfilled') {
      const j = JSON.stringify(deps.value);
      if (j !== deploymentsJson) {
        deploymentsJson = j;
        renderDeployments(deps.value && Array.isArray(deps.value.items) ? deps.value.items : []);
      }
    } else if (deps.reason.status !== 401) {
      deploymentsJson = '';
      fill(deployments, errorBox(deps.reason.message));
    }
  };
  let soon = null;
  const refreshSoon = () => {
    if (soon) return;
    soon = setTimeout(() => { soon = null; refresh(); }, 300);
  };
  ctx.onCleanup(() => clearTimeout(soon));

  const socket = follow({
    path: (last) => `/ws/sandboxes/${encodeURIComponent(name)}/logs?${last ? `from=${last + 1}` : `tail=${RUNTIME_TAIL}`}`,
    check: () => get(path('/api/sandboxes', name)),
    onStatus: (kind, text) => {
      if (kind === 'live') rtStatus.textContent = "Live: following the services' output…";
      else if (kind !== 'ended') rtStatus.textContent = text;
    },
    onFrame: (f) => {
      if (f.type === 'end') {
        rtStatus.textContent = `The sandbox has ended (${f.state || 'ended'}): its runtime log is gone.`;
        sandboxJson = '';
        refresh();
        return;
      }
      const line = frameLine(f);
      if (line) view.add(line);
      if (f.type === 'instance') refreshSoon();
    },
  });
  ctx.onCleanup(() => socket.close());

  (async () => {
    try {
      catalog = await get('/api/services');
      if (sandbox && !ctx.signal.aborted) renderReach();
    } catch {
      catalog = [];
    }
  })();
  refresh();
  showRequests();
  ctx.every(5000, refresh);
}
