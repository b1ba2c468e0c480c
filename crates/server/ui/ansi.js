// ANSI escape sequences in log lines: SGR colours (the 16 named ones, the 256-colour palette
// and 24-bit), bold, dim, italic, underline and reset become styled runs of text; every
// other sequence (cursor moves, erasing, titles, hyperlinks) and control character is
// dropped. Each line starts unstyled: a build that forgets its reset colours one line only.

// CSI (ESC [ params intermediates final), OSC (ESC ] … BEL or ESC \), and two-character
// escapes; also the 8-bit CSI.
const SEQUENCE = /\x1b\[([0-?]*)[ -/]*([@-~])|\x9b([0-?]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]?/g;
// Control characters but tab.
const CONTROL = /[\x00-\x08\x0a-\x1f\x7f]/g;

// The xterm palette's 16..255: a 6x6x6 cube, then 24 greys.
function palette(n) {
  if (n < 232) {
    const i = n - 16;
    const level = (v) => (v === 0 ? 0 : 55 + v * 40);
    return `rgb(${level(Math.floor(i / 36))}, ${level(Math.floor(i / 6) % 6)}, ${level(i % 6)})`;
  }
  const g = 8 + (n - 232) * 10;
  return `rgb(${g}, ${g}, ${g})`;
}

// A colour: a number 0..15 (named, styled by the theme), or a CSS colour string.
function extended(codes, i) {
  if (codes[i + 1] === 5 && codes[i + 2] >= 0 && codes[i + 2] <= 255) {
    const n = codes[i + 2];
    return [n < 16 ? n : palette(n), i + 2];
  }
  if (codes[i + 1] === 2 && codes.length > i + 4) {
    const [r, g, b] = codes.slice(i + 2, i + 5).map((v) => Math.max(0, Math.min(255, v || 0)));
    return [`rgb(${r}, ${g}, ${b})`, i + 4];
  }
  return [null, codes.length];
}

function applySgr(style, params) {
  const codes = params === '' ? [0] : params.split(/[;:]/).map((p) => (p === '' ? 0 : parseInt(p, 10)));
  const s = { ...style };
  for (let i = 0; i < codes.length; i++) {
    const c = codes[i];
    if (c === 0) {
      for (const k of Object.keys(s)) delete s[k];
    } else if (c === 1) s.bold = true;
    else if (c === 2) s.dim = true;
    else if (c === 3) s.italic = true;
    else if (c === 4) s.underline = true;
    else if (c === 22) { delete s.bold; delete s.dim; }
    else if (c === 23) delete s.italic;
    else if (c === 24) delete s.underline;
    else if (c >= 30 && c <= 37) s.fg = c - 30;
    else if (c >= 90 && c <= 97) s.fg = c - 90 + 8;
    else if (c === 39) delete s.fg;
    else if (c >= 40 && c <= 47) s.bg = c - 40;
    else if (c >= 100 && c <= 107) s.bg = c - 100 + 8;
    else if (c === 49) delete s.bg;
    else if (c === 38 || c === 48) {
      const [colour, next] = extended(codes, i);
      if (colour != null) s[c === 38 ? 'fg' : 'bg'] = colour;
      i = next;
    }
  }
  return s;
}

// A line as runs: [{text, style}], style holding bold, dim, italic, underline, fg, bg.
export function parseAnsi(line) {
  let text = String(line);
  // What a terminal would show of a line redrawn with carriage returns: its last drawing.
  const cr = text.replace(/\r+$/, '').lastIndexOf('\r');
  if (cr >= 0) text = text.slice(cr + 1);
  text = text.replace(/\r+$/, '');
  const runs = [];
  let style = {};
  let at = 0;
  const push = (chunk) => {
    const clean = chunk.replace(CONTROL, '');
    if (!clean) return;
    const last = runs[runs.length - 1];
    if (last && last.style === style) last.text += clean;
    else runs.push({ text: clean, style });
  };
  SEQUENCE.lastIndex = 0;
  for (let m; (m = SEQUENCE.exec(text)); ) {
    push(text.slice(at, m.index));
    at = SEQUENCE.lastIndex;
    const final = m[2] || m[4];
    if (final === 'm') style = applySgr(style, m[1] != null ? m[1] : m[3] || '');
  }
  push(text.slice(at));
  return runs;
}

// Fills `el` with the runs as text nodes and spans styled by class (the named colours) or
// by the style object (the others): never as markup.
export function renderRuns(el, runs) {
  for (const { text, style } of runs) {
    const keys = Object.keys(style);
    if (!keys.length) {
      el.append(document.createTextNode(text));
      continue;
    }
    const span = document.createElement('span');
    const classes = [];
    if (style.bold) classes.push('ansi-bold');
    if (style.dim) classes.push('ansi-dim');
    if (style.italic) classes.push('ansi-italic');
    if (style.underline) classes.push('ansi-underline');
    if (typeof style.fg === 'number') classes.push(`ansi-fg${style.fg}`);
    else if (style.fg) span.style.color = style.fg;
    if (typeof style.bg === 'number') classes.push(`ansi-bg${style.bg}`);
    else if (style.bg) span.style.backgroundColor = style.bg;
    span.className = classes.join(' ');
    span.textContent = text;
    el.append(span);
  }
}
