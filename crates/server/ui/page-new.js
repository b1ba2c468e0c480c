// A new sandbox: services of the catalog, a branch for each (searchable pickers answered by
// an agent with the user's own credentials), whether they follow their branches, a name and
// a lifetime. Deploying opens the deployment's page.

import { get, path, post } from './api.js';
import { empty, errorBox, fill, h, loading, messageBox } from './dom.js';
import { BranchPicker } from './picker.js';

const NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const TTLS = [['', 'Server default'], ['1h', '1 hour'], ['4h', '4 hours'], ['8h', '8 hours'], ['24h', '1 day'], ['72h', '3 days'], ['168h', '1 week']];

export default function newSandboxPage(root, ctx) {
  ctx.title('New sandbox');
  const name = h('input', { id: 'sandbox-name', name: 'sandbox-name', autocomplete: 'off', spellcheck: 'false', required: true, 'aria-describedby': 'sandbox-name-hint', value: ctx.query.get('name') || '' });
  const ttl = h('select', { id: 'sandbox-ttl', name: 'ttl' }, TTLS.map(([v, t]) => h('option', { value: v, text: t })));
  const same = h('input', { type: 'checkbox', id: 'same-branch' });
  const followAll = h('input', { type: 'checkbox', id: 'follow-branches' });
  const servicesBox = h('div', { id: 'deploy-services', class: 'services-pick' }, loading('Loading services…'));
  const error = messageBox('error', { id: 'deploy-error', role: 'alert' });
  const status = messageBox('muted', { id: 'deploy-status', role: 'status' });
  const submit = h('button', { type: 'submit', id: 'deploy-submit', class: 'primary' }, 'Deploy');
  const form = h('form', { id: 'deploy-form', class: 'card', novalidate: true },
    h('div', { class: 'form-row' },
      h('label', null, 'Sandbox name', name,
        h('span', { id: 'sandbox-name-hint', class: 'hint' }, "Lower-case letters, digits and '-'. A name of yours that is live is redeployed.")),
      h('label', null, 'Lifetime', ttl, h('span', { class: 'hint' }, 'It is deleted then, unless you extend it.'))),
    h('fieldset', { class: 'services-fieldset' },
      h('legend', null, 'Services and branches'),
      h('label', { class: 'check' }, same, 'Deploy the same branch for every selected service'),
      servicesBox,
      h('label', { class: 'check' }, followAll, 'Follow the branches: redeploy a service on every push to its branch (while you are logged in)')),
    error.el, status.el,
    h('div', { class: 'form-actions' }, submit, h('a', { href: '/sandboxes', class: 'button' }, 'Cancel')));
  root.append(h('div', { class: 'page-head' }, h('h1', null, 'New sandbox')), form);

  const rows = [];

  // With the shortcut on, a branch chosen for one service is chosen for every selected one
  // that has it.
  const share = (from, branch) => {
    if (!same.checked) return;
    for (const row of rows) {
      if (row === from || !row.box.checked || !row.loaded) continue;
      if (row.picker.has(branch)) {
        row.picker.choose(branch, { quiet: true });
        row.missing.textContent = '';
      } else {
        row.missing.textContent = `${row.name} has no branch ${branch}`;
      }
    }
  };
  const sharedBranch = () => {
    const first = rows.find((r) => r.box.checked && r.loaded);
    return first ? first.picker.value : '';
  };

  const loadBranches = async (row) => {
    row.loading = true;
    row.picker.setLoading();
    try {
      const list = await get(path('/api/services', row.name, 'branches'));
      if (ctx.signal.aborted) return;
      row.picker.setBranches(Array.isArray(list) ? list : []);
      row.loaded = Array.isArray(list) && list.length > 0;
      const shared = same.checked && sharedBranch();
      if (shared && row.picker.has(shared)) row.picker.choose(shared, { quiet: true });
      if (row.box.checked && row.loaded) row.picker.input.focus();
    } catch (e) {
      if (ctx.signal.aborted) return;
      row.picker.setError(e.message);
    } finally {
      row.loading = false;
    }
  };

  const renderServices = (services) => {
    if (!services.length) {
      fill(servicesBox, empty('The catalog has no services', 'The server\'s configuration lists the services that can be deployed.'));
      return;
    }
    const items = services.map((s) => {
      const box = h('input', { type: 'checkbox', 'data-deploy-service': s.name, 'aria-label': `Deploy ${s.name}` });
      const missing = h('span', { class: 'err-text' });
      const row = { name: s.name, box, loaded: false, loading: false, missing };
      row.picker = new BranchPicker({ service: s.name, onChange: (b) => { missing.textContent = ''; share(row, b); } });
      rows.push(row);
      box.addEventListener('change', () => {
        item.classList.toggle('selected', box.checked);
        row.picker.el.hidden = !box.checked;
        missing.textContent = '';
        if (box.checked && !row.loaded && !row.loading) loadBranches(row);
        else if (box.checked && row.loaded) row.picker.input.focus();
      });
      row.picker.el.hidden = true;
      const item = h('div', { class: 'service-pick', 'data-new-service': s.name },
        h('label', { class: 'check' }, box, h('strong', { text: s.name })),
        // A gateway has no routes of its own: it takes every request of the sandbox.
        h('span', { class: 'muted routes', text: s.kind === 'gateway' ? 'API gateway: every request of the sandbox' : (s.routes || []).join(' ') }),
        row.picker.el, missing);
      return item;
    });
    fill(servicesBox, ...items);
  };

  (async () => {
    try {
      const services = await get('/api/services');
      if (!ctx.signal.aborted) renderServices(Array.isArray(services) ? services : []);
    } catch (e) {
      if (!ctx.signal.aborted && e.status !== 401) fill(servicesBox, errorBox(e.message));
    }
  })();

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const sandbox = name.value.trim();
    if (!NAME.test(sandbox)) {
      error.set("Name the sandbox with lower-case letters, digits and '-' (not at either end), at most 63.");
      name.focus();
      return;
    }
    const chosen = rows.filter((r) => r.box.checked);
    if (!chosen.length) {
      error.set('Tick at least one service to deploy.');
      return;
    }
    const waiting = chosen.filter((r) => r.loading);
    if (waiting.length) {
      error.set(`Wait for the branches of ${waiting.map((r) => r.name).join(', ')} to load.`);
      return;
    }
    const unusable = chosen.filter((r) => !r.loaded);
    if (unusable.length) {
      error.set(`No branch of ${unusable.map((r) => r.name).join(', ')} could be listed: untick it, or try again later.`);
      return;
    }
    const lacking = chosen.filter((r) => r.missing.textContent);
    if (lacking.length) {
      error.set(lacking.map((r) => r.missing.textContent).join('; '));
      return;
    }
    // Unticked, a redeploy leaves each service's following as it was.
    const services = chosen.map((r) => ({ service: r.name, branch: r.picker.value, ...(followAll.checked ? { follow: true } : {}) }));
    error.set('');
    submit.disabled = true;
    status.set(`Creating sandbox ${sandbox}…`);
    try {
      let accepted;
      try {
        const body = { name: sandbox, services };
        if (ttl.value) body.ttl = ttl.value;
        accepted = await post('/api/sandboxes', body);
      } catch (err) {
        if (err.code !== 'sandbox_exists') throw err;
        status.set(`Sandbox ${sandbox} exists: redeploying it with these branches…`);
        accepted = await post(path('/api/sandboxes', sandbox, 'deploy'), { services });
      }
      const dep = accepted && accepted.deployment;
      if (dep && dep.id) ctx.navigate(`/deployments/${encodeURIComponent(dep.id)}`);
      else ctx.navigate(`/sandboxes/${encodeURIComponent(sandbox)}`);
    } catch (err) {
      if (ctx.signal.aborted) return;
      submit.disabled = false;
      status.set('');
      if (err.status !== 401) error.set(err.message);
    }
  });
}
