// Building the DOM. Text from the server only ever becomes text nodes and attribute values,
// never markup: there is no innerHTML in this app.

// Set as properties rather than attributes: they are live state, not markup.
const PROPS = new Set(['value', 'checked', 'disabled', 'hidden', 'selected', 'open', 'indeterminate']);

// h('a', {href, class, text, onclick, 'data-x': 1}, child, [children], null…)
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (props) {
    for (const [k, v] of Object.entries(props)) {
      if (v == null || (v === false && !PROPS.has(k))) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = String(v);
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (PROPS.has(k)) el[k] = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c == null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Replaces `el`'s children with `children` (nested arrays and nulls allowed, as in h()).
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function table(headers, rows, props) {
  return h('table', props,
    h('thead', null, h('tr', null, headers.map((t) => h('th', { scope: 'col', text: t })))),
    h('tbody', null, rows));
}

export function errorBox(message, props) {
  return h('div', { class: 'error', role: 'alert', ...props }, message);
}

// An empty state: what is missing, and what to do about it.
export function empty(title, text, action) {
  return h('div', { class: 'empty' }, h('p', { class: 'empty-title', text: title }), text ? h('p', { class: 'muted', text }) : null, action);
}

export function loading(text) {
  return h('p', { class: 'muted loading', text: text || 'Loading…' });
}

// States that read as good, under way, bad or resting.
const TONE = {
  ready: 'ok', running: 'ok', healthy: 'ok', done: 'ok', connected: 'ok',
  deploying: 'busy', queued: 'busy', fetching: 'busy', building: 'busy', starting: 'busy', routing: 'busy', restarting: 'busy',
  failed: 'bad', crashed: 'bad', unhealthy: 'bad', cancelled: 'bad',
  sleeping: 'rest', skipped: 'rest',
  // A webhook delivery's signature (`none`: a poll, which has none).
  valid: 'ok', invalid: 'bad', missing: 'bad', none: 'rest',
};
export const PROBLEM = new Set(['crashed', 'unhealthy', 'failed']);

function tone(state) {
  return TONE[state] || 'plain';
}

export function badge(state, props) {
  const s = String(state || 'unknown');
  return h('span', { class: `badge ${tone(s)} ${s}`, ...props, text: s });
}

export function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

export function shortSha(sha, n = 8) {
  return String(sha || '').slice(0, n);
}

export function fmtTime(iso) {
  const d = new Date(iso);
  return isNaN(d.getTime()) ? String(iso || '—') : d.toLocaleString();
}

export function clock(iso) {
  const d = new Date(iso);
  return isNaN(d.getTime()) ? '' : d.toLocaleTimeString();
}

// "850 ms", "12.3 s", "2 min 05 s", "1 h 02 min".
export function fmtDuration(ms) {
  if (!(ms >= 0)) return '';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(Math.floor(s % 60)).padStart(2, '0')} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, '0')} min`;
}

// "in 3 h", "5 min ago".
function relative(iso, now = Date.now()) {
  const t = new Date(iso).getTime();
  if (isNaN(t)) return '—';
  const diff = t - now;
  const abs = Math.abs(diff);
  const units = [['d', 86400000], ['h', 3600000], ['min', 60000], ['s', 1000]];
  let text = 'now';
  for (const [u, ms] of units) {
    if (abs >= ms) {
      text = `${Math.floor(abs / ms)} ${u}`;
      break;
    }
  }
  if (text === 'now') return 'just now';
  return diff > 0 ? `in ${text}` : `${text} ago`;
}

// A time shown relative, with the exact time on hover and to assistive technology.
export function timeEl(iso, props) {
  return h('time', { datetime: iso || '', title: fmtTime(iso), ...props, text: relative(iso) });
}

// A button that copies `text`, and says so.
export function copyButton(text, label) {
  const b = h('button', { type: 'button', class: 'small copy', 'data-copy': text, 'aria-label': label || 'Copy' }, 'Copy');
  b.addEventListener('click', async () => {
    const ok = await copy(text);
    b.textContent = ok ? 'Copied' : 'Copy failed';
    setTimeout(() => { b.textContent = 'Copy'; }, 1500);
  });
  return b;
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Without the clipboard API (a page served over plain http to another host).
    const area = h('textarea', { class: 'sr', readonly: true, value: text });
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand('copy');
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }
}

// A message in a box that says its text, for errors and statuses set later.
export function messageBox(className, props) {
  const box = h('div', { class: className, hidden: true, ...props });
  return {
    el: box,
    set(text) {
      box.textContent = text || '';
      box.hidden = !text;
    },
  };
}

// Shell quoting for ready-to-paste command lines.
export function shq(s) {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${String(s).replace(/'/g, `'\\''`)}'`;
}
