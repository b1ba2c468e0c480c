// A branch picker: a combobox (WAI-ARIA 1.2, list autocomplete) over a service's branches,
// each shown with its commit. Typing filters (best matches first: the name itself, then
// names that start with it, then names with a part that starts with it, then the rest);
// arrows, Page Up/Down, Enter and Escape work from the keyboard. It draws at most LIMIT
// options however many branches there are, so 5,000 branches filter as fast as 5.

import { h, shortSha } from './dom.js';

const LIMIT = 50;
let serial = 0;

export class BranchPicker {
  constructor({ service, onChange }) {
    this.service = service;
    this.onChange = onChange || (() => {});
    this.branches = [];
    this.value = '';
    this.matches = [];
    this.active = -1;
    const id = `picker-${++serial}`;
    this.listId = `${id}-list`;
    this.input = h('input', {
      type: 'text',
      role: 'combobox',
      'aria-autocomplete': 'list',
      'aria-expanded': 'false',
      'aria-controls': this.listId,
      'aria-label': `Branch of ${service}`,
      autocomplete: 'off',
      spellcheck: 'false',
      placeholder: 'Search branches…',
      disabled: true,
    });
    this.list = h('ul', { id: this.listId, role: 'listbox', class: 'picker-list', 'aria-label': `Branches of ${service}`, hidden: true });
    this.note = h('span', { class: 'picker-note muted', 'aria-live': 'polite' });
    this.el = h('div', { class: 'picker', 'data-picker': service }, this.input, this.list, this.note);

    this.input.addEventListener('input', () => this.refilter(this.input.value));
    // Typing replaces the choice shown, and the list shows every branch to start with.
    this.input.addEventListener('focus', () => {
      this.input.select();
      this.openList('');
    });
    this.input.addEventListener('click', () => this.openList(''));
    this.input.addEventListener('blur', () => this.settle());
    this.input.addEventListener('keydown', (e) => this.onKey(e));
    // Choosing with the mouse must not blur the input first.
    this.list.addEventListener('mousedown', (e) => e.preventDefault());
    this.list.addEventListener('click', (e) => {
      const li = e.target.closest('li[data-branch]');
      if (li) this.choose(li.dataset.branch);
    });
  }

  setLoading() {
    this.input.disabled = true;
    this.input.value = '';
    this.note.className = 'picker-note muted';
    this.note.textContent = 'Loading branches…';
  }

  setError(message) {
    this.input.disabled = true;
    this.note.className = 'picker-note err-text';
    this.note.textContent = message;
  }

  // `list`: [{name, commit}], as the API gives them.
  setBranches(list) {
    this.branches = list.map((b, i) => ({ name: String(b.name), commit: String(b.commit || ''), lower: String(b.name).toLowerCase(), i }));
    this.byName = new Map(this.branches.map((b) => [b.name, b]));
    this.input.disabled = false;
    this.note.className = 'picker-note muted';
    const n = this.branches.length;
    this.note.textContent = n ? `${n.toLocaleString()} ${n === 1 ? 'branch' : 'branches'}` : 'No branches';
    const preferred = ['main', 'master', 'develop'].find((b) => this.byName.has(b));
    this.choose(this.value && this.byName.has(this.value) ? this.value : preferred || (this.branches[0] && this.branches[0].name) || '', { quiet: true });
  }

  has(name) {
    return Boolean(this.byName && this.byName.has(name));
  }

  choose(name, { quiet = false } = {}) {
    this.value = name;
    this.input.value = name;
    this.closeList();
    if (!quiet) this.onChange(name);
  }

  openList(query) {
    if (this.input.disabled) return;
    this.refilter(query);
  }

  closeList() {
    this.list.hidden = true;
    this.input.setAttribute('aria-expanded', 'false');
    this.input.removeAttribute('aria-activedescendant');
    this.active = -1;
  }

  // A typed name that is a branch is chosen; anything else goes back to the choice.
  settle() {
    const typed = this.input.value.trim();
    if (typed !== this.value && this.has(typed)) this.choose(typed);
    else this.input.value = this.value;
    this.closeList();
  }

  refilter(query) {
    const q = query.trim().toLowerCase();
    let matches;
    if (!q) {
      matches = this.branches;
    } else {
      const scored = [];
      for (const b of this.branches) {
        const at = b.lower.indexOf(q);
        if (at < 0) continue;
        let score = 3;
        if (b.lower === q) score = 0;
        else if (at === 0) score = 1;
        else if ('/-_.'.includes(b.lower[at - 1])) score = 2;
        scored.push([score, b]);
      }
      scored.sort((a, b) => a[0] - b[0] || a[1].i - b[1].i);
      matches = scored.map((s) => s[1]);
    }
    this.matches = matches;
    const chosen = matches.findIndex((b) => b.name === this.value);
    this.active = q ? (matches.length ? 0 : -1) : Math.min(chosen, LIMIT - 1);
    this.drawList(q);
  }

  drawList(q) {
    const shown = this.matches.slice(0, LIMIT);
    const items = shown.map((b, i) => {
      const name = h('span', { class: 'picker-name' });
      const at = q ? b.lower.indexOf(q) : -1;
      if (at >= 0) name.append(b.name.slice(0, at), h('mark', { text: b.name.slice(at, at + q.length) }), b.name.slice(at + q.length));
      else name.append(b.name);
      return h('li', {
        id: `${this.listId}-${i}`,
        role: 'option',
        'data-branch': b.name,
        'aria-selected': i === this.active ? 'true' : 'false',
        class: b.name === this.value ? 'chosen' : null,
      }, name, h('code', { class: 'picker-sha', title: b.commit, text: shortSha(b.commit, 12) }));
    });
    const rest = this.matches.length - shown.length;
    if (rest > 0) items.push(h('li', { class: 'picker-more muted', role: 'presentation', text: `${rest.toLocaleString()} more: type to narrow` }));
    if (!this.matches.length) items.push(h('li', { class: 'picker-more muted', role: 'presentation', text: 'No branch matches' }));
    this.list.replaceChildren(...items);
    this.list.hidden = false;
    this.input.setAttribute('aria-expanded', 'true');
    this.highlight();
  }

  highlight() {
    const items = this.list.querySelectorAll('li[role=option]');
    items.forEach((li, i) => li.setAttribute('aria-selected', i === this.active ? 'true' : 'false'));
    const li = items[this.active];
    if (li) {
      this.input.setAttribute('aria-activedescendant', li.id);
      li.scrollIntoView({ block: 'nearest' });
    } else {
      this.input.removeAttribute('aria-activedescendant');
    }
  }

  move(by) {
    const n = Math.min(this.matches.length, LIMIT);
    if (!n) return;
    this.active = Math.max(0, Math.min(n - 1, (this.active < 0 ? (by > 0 ? -1 : n) : this.active) + by));
    this.highlight();
  }

  onKey(e) {
    const open = !this.list.hidden;
    switch (e.key) {
      case 'ArrowDown':
        e.preventDefault();
        if (!open) this.openList('');
        else this.move(1);
        break;
      case 'ArrowUp':
        e.preventDefault();
        if (!open) this.openList('');
        else this.move(-1);
        break;
      case 'PageDown':
        if (open) { e.preventDefault(); this.move(10); }
        break;
      case 'PageUp':
        if (open) { e.preventDefault(); this.move(-10); }
        break;
      case 'Enter':
        // Enter picks the highlighted branch; it never submits the form from here.
        if (open) {
          e.preventDefault();
          const b = this.matches[this.active];
          if (b) this.choose(b.name);
          else this.settle();
        }
        break;
      case 'Escape':
        if (open) {
          e.preventDefault();
          this.input.value = this.value;
          this.closeList();
        }
        break;
      default:
        break;
    }
  }
}
