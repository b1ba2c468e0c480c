// What the deployment and sandbox pages share around a log view: frames made lines, and
// the toolbar (service and stream filters, the follow toggle).

import { fill, h, plural } from './dom.js';

// A frame of a log WebSocket as a line of the view.
export function frameLine(f) {
  const service = f.service == null ? 'sdp' : String(f.service);
  if (f.type === 'log') {
    const stream = String(f.stream || '');
    return { kind: 'log', seq: f.seq, ts: f.ts, service, stream, prefix: `[${service}/${stream}]`, text: f.line == null ? '' : String(f.line) };
  }
  if (f.type === 'step') {
    return { kind: 'step', seq: f.seq, ts: f.ts, service, stream: 'step', prefix: `[${service}]`, text: `step ${f.step}: ${f.state}`, cls: String(f.state || '') };
  }
  if (f.type === 'instance') {
    const n = typeof f.restarts === 'number' ? f.restarts : 0;
    const st = String(f.state || '');
    const text = `── ${service} is ${st}${f.reason ? `: ${f.reason}` : ''}${n > 0 ? ` (${plural(n, 'restart', 'restarts')})` : ''} ──`;
    return { kind: 'instance', seq: f.seq, ts: f.ts, service, stream: 'instance', text, cls: ['crashed', 'unhealthy', 'failed'].includes(st) ? 'problem' : '' };
  }
  return null;
}

// The toolbar: a service filter, stream toggles and the follow toggle, wired to `view`.
// Returns {el, setServices(names)}.
export function logToolbar(view, { idPrefix, streams }) {
  const service = h('select', { id: `${idPrefix}-service`, 'aria-label': 'Service' }, h('option', { value: '', text: 'All services' }));
  const shown = new Set(streams.map(([s]) => s));
  const toggles = streams.map(([s, label]) => {
    const box = h('input', { type: 'checkbox', checked: true, 'data-stream-filter': s });
    box.addEventListener('change', () => {
      if (box.checked) shown.add(s);
      else shown.delete(s);
      view.setFilter({ streams: new Set(shown) });
    });
    return h('label', { class: 'check chip' }, box, label);
  });
  const followBtn = h('button', { type: 'button', id: `${idPrefix}-follow`, class: 'small toggle', 'aria-pressed': 'true', text: 'Following' });
  const showFollow = (on) => {
    followBtn.setAttribute('aria-pressed', on ? 'true' : 'false');
    followBtn.textContent = on ? 'Following' : 'Follow';
  };
  view.onFollow = showFollow;
  followBtn.addEventListener('click', () => view.setFollow(!view.follow));
  service.addEventListener('change', () => view.setFilter({ service: service.value }));
  const el = h('div', { class: 'log-tools' },
    h('label', { class: 'inline' }, 'Service', service),
    h('span', { class: 'chips', role: 'group', 'aria-label': 'Streams' }, toggles),
    followBtn);
  let known = '';
  return {
    el,
    service,
    // The services offered; a choice that is still one of them stays.
    setServices(names) {
      const key = names.join('\u0000');
      if (key === known) return;
      known = key;
      const chosen = service.value;
      fill(service, h('option', { value: '', text: 'All services' }), names.map((n) => h('option', { value: n, text: n })));
      service.value = names.includes(chosen) ? chosen : '';
      if (service.value !== chosen) service.dispatchEvent(new Event('change'));
    },
  };
}
