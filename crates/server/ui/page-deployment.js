// A deployment: each service's steps with how long each took, and its log, live: coloured
// as the build printed it, progress bars redrawn in place, filtered by service and stream,
// followed until the user scrolls up, resumed without gap or repeat after a dropped
// connection, and downloadable whole.

import { get, path } from './api.js';
import { badge, errorBox, fill, fmtDuration, h, loading, shortSha, timeEl } from './dom.js';
import { follow } from './follow.js';
import { frameLine, logToolbar } from './logtools.js';
import { LogView } from './logview.js';

const ENDED = new Set(['ready', 'failed', 'cancelled']);
const STREAMS = [['stdout', 'stdout'], ['stderr', 'stderr'], ['system', 'system'], ['step', 'steps']];

function span(start, end, now) {
  const a = new Date(start).getTime();
  const b = end ? new Date(end).getTime() : now;
  return isNaN(a) || isNaN(b) ? NaN : b - a;
}

export default function deploymentPage(root, ctx) {
  const id = ctx.params.id;
  ctx.title(`Deployment ${id}`);
  const state = h('span', { id: 'dep-state' });
  const meta = h('p', { id: 'dep-meta', class: 'muted' });
  const depError = h('div', { id: 'dep-error' });
  const timeline = h('div', { id: 'timeline', class: 'timeline' }, loading());
  const view = new LogView({ id: 'log-lines', label: 'Deployment log', max: 200000 });
  const tools = logToolbar(view, { idPrefix: 'log', streams: STREAMS });
  const status = h('p', { id: 'log-status', class: 'muted', role: 'status' }, 'Connecting…');
  const count = h('span', { id: 'log-count', class: 'muted' });
  const download = h('a', { id: 'log-download', class: 'button small', href: path('/api/deployments', id, 'logs'), download: `${id}.log` }, 'Download');
  root.append(
    h('div', { class: 'page-head' }, h('h1', null, 'Deployment ', h('code', { text: id })), state),
    meta, depError,
    h('section', { class: 'card', 'aria-labelledby': 'timeline-title' },
      h('h2', { id: 'timeline-title' }, 'Steps'), timeline),
    h('section', { class: 'card', 'aria-labelledby': 'log-title' },
      h('div', { class: 'section-head' }, h('h2', { id: 'log-title' }, 'Log'), count, download),
      tools.el, status, view.el));

  let dep = null;
  let sandboxName = '';
  // Built once and updated in place: the line is redrawn every second while the deployment
  // runs, and a link replaced under the pointer would lose the click.
  const sandboxRef = h('span');
  const requester = h('strong');
  const started = h('span');
  const took = h('span');
  const agent = h('span');
  fill(meta, 'Sandbox ', sandboxRef, ' · requested by ', requester, ' · started ', started, ' · ', took, agent);
  let shownRef = null;
  let shownState = '';
  const renderHead = () => {
    if (dep.state !== shownState) {
      shownState = dep.state;
      fill(state, badge(dep.state, { 'data-dep-state': dep.state }));
      fill(depError, dep.error ? errorBox(dep.error) : null);
    }
    const ref = sandboxName || dep.sandbox_id;
    if (ref !== shownRef) {
      shownRef = ref;
      fill(sandboxRef, sandboxName
        ? h('a', { id: 'dep-sandbox', href: `/sandboxes/${encodeURIComponent(sandboxName)}`, text: sandboxName })
        : h('code', { text: dep.sandbox_id }));
    }
    requester.textContent = dep.requested_by;
    fill(started, timeEl(dep.created_at));
    const d = span(dep.created_at, dep.finished_at, Date.now());
    took.textContent = dep.finished_at ? `took ${fmtDuration(d)}` : `running for ${fmtDuration(d)}`;
    fill(agent, dep.agent ? [' · on ', h('code', { text: dep.agent })] : null);
  };

  const renderTimeline = () => {
    const now = Date.now();
    const steps = Array.isArray(dep.steps) ? dep.steps : [];
    const chip = (s) => {
      const d = span(s.started_at, s.ended_at, now);
      return h('li', { class: `tl-step ${s.state}`, 'data-step': s.step, 'data-step-state': s.state, title: `${s.step}: ${s.state}` },
        h('span', { class: 'tl-step-name', text: s.step }),
        h('span', { class: 'tl-step-time', 'data-duration-ms': isNaN(d) ? '' : Math.round(d), text: s.state === 'skipped' ? 'skipped' : fmtDuration(d) }));
    };
    const rows = (dep.services || []).map((svc) => {
      const own = steps.filter((s) => s.service === svc.service);
      const total = own.length ? span(own[0].started_at, own[own.length - 1].ended_at, now) : NaN;
      return h('div', { class: 'tl-row', 'data-timeline-service': svc.service },
        h('div', { class: 'tl-head' },
          h('strong', { text: svc.service }), ' ',
          h('code', { text: svc.branch }), svc.commit ? [' ', h('code', { class: 'muted', title: svc.commit, text: shortSha(svc.commit) })] : null,
          ' ', badge(svc.state),
          isNaN(total) ? null : h('span', { class: 'muted tl-total', text: fmtDuration(total) })),
        own.length ? h('ol', { class: 'tl-steps' }, own.map(chip)) : h('p', { class: 'muted', text: 'Waiting for an agent.' }));
    });
    const whole = steps.filter((s) => s.service == null);
    if (whole.length) {
      rows.push(h('div', { class: 'tl-row', 'data-timeline-service': '' },
        h('div', { class: 'tl-head' }, h('strong', { text: 'sandbox' })),
        h('ol', { class: 'tl-steps' }, whole.map(chip))));
    }
    fill(timeline, ...rows);
  };

  let refreshing = false;
  const refresh = async () => {
    if (refreshing) return;
    refreshing = true;
    try {
      dep = await get(path('/api/deployments', id));
      if (ctx.signal.aborted) return;
      if (!sandboxName) {
        try {
          sandboxName = (await get(path('/api/sandboxes', dep.sandbox_id))).name || '';
        } catch {
          sandboxName = '';
        }
      }
      if (ctx.signal.aborted) return;
      renderHead();
      renderTimeline();
      tools.setServices([...(dep.services || []).map((s) => s.service), 'sdp']);
    } catch (e) {
      if (ctx.signal.aborted || e.status === 401) return;
      fill(timeline, errorBox(e.message));
    } finally {
      refreshing = false;
    }
  };
  let soon = null;
  const refreshSoon = () => {
    if (soon) return;
    soon = setTimeout(() => { soon = null; refresh(); }, 400);
  };
  ctx.onCleanup(() => clearTimeout(soon));
  // Running steps' durations count up.
  ctx.every(1000, () => {
    if (dep && !ENDED.has(dep.state)) {
      renderHead();
      renderTimeline();
    }
  });

  const showCount = () => {
    count.textContent = `${view.count.toLocaleString()} lines`;
  };
  const socket = follow({
    path: (last) => `/ws/deployments/${encodeURIComponent(id)}?from=${last + 1}`,
    check: () => get(path('/api/deployments', id)),
    onStatus: (kind, text) => {
      if (kind === 'live') status.textContent = 'Live: following the deployment…';
      else if (kind !== 'ended') status.textContent = text;
      status.dataset.connection = kind;
    },
    onFrame: (f) => {
      if (f.type === 'end') {
        const err = f.error ? `: ${f.error}` : '';
        const word = f.state === 'ready' ? 'ready' : f.state === 'cancelled' ? 'cancelled' : 'failed';
        const text = `Deployment ${word}${word === 'ready' ? '' : err}`;
        status.textContent = text;
        status.setAttribute('data-end-state', String(f.state || ''));
        view.add({ kind: 'end', seq: f.seq, ts: f.ts, service: 'sdp', stream: 'end', text, cls: word });
        refresh();
      } else {
        const line = frameLine(f);
        if (line) view.add(line);
        if (f.type === 'step') refreshSoon();
      }
      showCount();
    },
  });
  ctx.onCleanup(() => socket.close());
  refresh();
}
