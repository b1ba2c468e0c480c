// The agents: every host that has connected, its role and version, what it runs, and when
// it was last heard from.

import { get } from './api.js';
import { badge, empty, errorBox, fill, h, loading, plural, table, timeEl } from './dom.js';

export default function agentsPage(root, ctx) {
  ctx.title('Agents');
  const list = h('div', { id: 'agents', class: 'table-wrap' }, loading('Loading agents…'));
  root.append(h('div', { class: 'page-head' }, h('h1', null, 'Agents')),
    h('p', { class: 'muted', text: 'Micro agents fetch, build and run services on deploy hosts; gateway agents run the sandbox router. They dial the control plane.' }),
    list);
  let last = '';
  const load = async () => {
    let agents;
    try {
      agents = await get('/api/agents');
    } catch (e) {
      if (!ctx.signal.aborted && e.status !== 401) {
        last = '';
        fill(list, errorBox(e.message));
      }
      return;
    }
    if (ctx.signal.aborted) return;
    const json = JSON.stringify(agents);
    if (json === last) return;
    last = json;
    if (!Array.isArray(agents) || !agents.length) {
      fill(list, empty('No agent has connected yet', 'Start one with `sdp agent --config agent.toml`; it needs the agent token.'));
      return;
    }
    const rows = agents.map((a) => h('tr', { 'data-agent': a.name },
      h('td', null, h('strong', { text: a.name })),
      h('td', null, badge(a.connected ? 'connected' : 'offline', { 'data-connected': a.connected ? 'true' : 'false' })),
      h('td', { text: a.role || '' }),
      h('td', null, h('code', { text: a.host || '' })),
      h('td', { text: a.version || '' }),
      h('td', { 'data-running': a.running, text: a.role === 'micro' ? plural(a.running || 0, 'instance', 'instances') : '—' }),
      h('td', { text: String(a.load ?? '') }),
      h('td', null, timeEl(a.last_seen))));
    fill(list, table(['Name', 'State', 'Role', 'Host', 'Version', 'Runs', 'Jobs', 'Last seen'], rows));
  };
  load();
  ctx.every(10000, load);
}
