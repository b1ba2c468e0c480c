// A log view that stays smooth with hundreds of thousands of lines: lines are kept as data
// and only the rows in sight (and a margin) are in the DOM, drawn at most once a frame.
// Rows have one fixed height (lines do not wrap; the view scrolls sideways), so a row's
// place is its index times that height.
//
// A log line that ended with a lone carriage return (a progress bar's redraw: the agent
// keeps the `\r` at its end) is replaced by the next line of the same service and stream,
// so a progress bar ends as one line, as a terminal shows it.

import { parseAnsi, renderRuns } from './ansi.js';
import { clock, h } from './dom.js';

const OVERSCAN = 30;

export class LogView {
  // `max`: the lines kept (the oldest go first); `times`: a clock column.
  constructor({ id, label, max = 200000, times = false }) {
    this.max = max;
    this.times = times;
    this.lines = [];
    this.shown = [];
    this.open = new Map();
    this.filter = { service: '', streams: null };
    this.follow = true;
    this.onFollow = null;
    this.pending = false;
    this.rowHeight = 0;
    this.rows = h('div', { class: 'log-rows' });
    this.spacer = h('div', { class: 'log-spacer' }, this.rows);
    // A log's lines are not read out as they come (a build's would drown everything else):
    // the status line beside it says what happens.
    this.el = h('div', { class: 'logview', id, role: 'log', 'aria-live': 'off', tabindex: 0, 'aria-label': label, 'data-lines': 0 }, this.spacer);
    this.el.addEventListener('scroll', () => this.onScroll(), { passive: true });
    this.el.addEventListener('keydown', (e) => {
      if (e.key === 'End') this.setFollow(true);
    });
    if (window.ResizeObserver) new ResizeObserver(() => this.schedule()).observe(this.el);
  }

  // Adds a line: {seq, ts, service, stream, kind ('log', 'step', 'instance', 'end'), text,
  // cls}. Its text may hold ANSI sequences.
  add(line) {
    if (line.kind === 'log') {
      const key = `${line.service}\u0000${line.stream}`;
      const progress = line.text.endsWith('\r');
      const previous = this.open.get(key);
      if (previous && !previous.gone) {
        previous.text = line.text;
        previous.seq = line.seq;
        previous.ts = line.ts;
        previous.runs = null;
        if (!progress) this.open.delete(key);
        this.schedule();
        return;
      }
      if (progress) this.open.set(key, line);
      else this.open.delete(key);
    }
    this.lines.push(line);
    if (this.passes(line)) this.shown.push(line);
    this.schedule();
  }

  // `service`: '' for all; `streams`: a Set of the streams and kinds shown, or null for all.
  setFilter(filter) {
    this.filter = { ...this.filter, ...filter };
    this.shown = this.lines.filter((l) => this.passes(l));
    this.schedule();
  }

  passes(line) {
    const { service, streams } = this.filter;
    if (service && line.service !== service) return false;
    if (streams && line.kind !== 'end' && !streams.has(line.kind === 'log' ? line.stream : line.kind)) return false;
    return true;
  }

  setFollow(on) {
    if (this.follow === on) return;
    this.follow = on;
    if (this.onFollow) this.onFollow(on);
    this.schedule();
  }

  get count() {
    return this.shown.length;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    // A hidden tab gets no animation frames; the lines still go in, a little later.
    const run = () => { this.pending = false; this.draw(); };
    if (document.hidden) setTimeout(run, 100);
    else requestAnimationFrame(run);
  }

  onScroll() {
    const el = this.el;
    const atBottom = el.scrollHeight - el.scrollTop - el.clientHeight <= Math.max(4, this.rowHeight);
    // Scrolling up stops following; back at the bottom, it follows again.
    if (atBottom !== this.follow) this.setFollow(atBottom);
    this.schedule();
  }

  trim() {
    const excess = this.lines.length - this.max;
    if (excess <= 0) return;
    const gone = this.lines.splice(0, excess);
    for (const l of gone) l.gone = true;
    let dropped = 0;
    while (dropped < this.shown.length && this.shown[dropped].gone) dropped++;
    this.shown.splice(0, dropped);
    // Keep what the user is reading in place while older lines leave above it.
    if (!this.follow) this.el.scrollTop -= dropped * this.rowHeight;
  }

  // The rows' height, once the view is in the document (its resize draws it again then).
  measure() {
    if (this.rowHeight) return true;
    if (!this.el.isConnected) return false;
    const probe = h('div', { class: 'log-row' }, 'x');
    this.rows.append(probe);
    this.rowHeight = probe.getBoundingClientRect().height;
    probe.remove();
    return this.rowHeight > 0;
  }

  draw() {
    if (!this.measure()) return;
    this.trim();
    const el = this.el;
    const total = this.shown.length;
    const rh = this.rowHeight;
    this.spacer.style.height = `${total * rh}px`;
    el.dataset.lines = String(total);
    if (this.follow) el.scrollTop = el.scrollHeight;
    const first = Math.max(0, Math.floor(el.scrollTop / rh) - OVERSCAN);
    const last = Math.min(total, Math.ceil((el.scrollTop + el.clientHeight) / rh) + OVERSCAN);
    this.rows.style.transform = `translateY(${first * rh}px)`;
    const frag = document.createDocumentFragment();
    for (let i = first; i < last; i++) frag.append(this.row(this.shown[i], i));
    this.rows.replaceChildren(frag);
  }

  row(line, index) {
    const cls = ['log-row', line.kind];
    if (line.kind === 'log') cls.push(line.stream);
    if (line.cls) cls.push(line.cls);
    const row = h('div', {
      class: cls.join(' '),
      'data-index': index,
      'data-seq': line.seq,
      'data-service': line.service,
      'data-stream': line.stream,
      'data-kind': line.kind,
      title: line.ts || null,
    });
    if (this.times) row.append(h('span', { class: 'log-time', text: `${clock(line.ts)} ` }));
    if (line.prefix) row.append(h('span', { class: 'log-prefix', text: `${line.prefix} ` }));
    if (!line.runs) line.runs = parseAnsi(line.text);
    renderRuns(row, line.runs);
    return row;
  }
}
