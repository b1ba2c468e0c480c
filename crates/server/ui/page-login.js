// Sign in with the Bitbucket credentials; then on to the page the user asked for.

import { ApiError, get, post } from './api.js';
import { h, messageBox } from './dom.js';
import { session } from './session.js';

// Only a path of this app: never another site, whatever the link said.
export function safeNext(next) {
  return next && /^\/(?!\/)/.test(next) && !next.startsWith('/login') ? next : '/sandboxes';
}

export default function loginPage(root, ctx) {
  ctx.title('Sign in');
  const next = safeNext(ctx.query.get('next'));
  const error = messageBox('error', { id: 'login-error', role: 'alert' });
  const status = h('p', { id: 'login-status', class: 'muted', role: 'status', hidden: true });
  const username = h('input', { id: 'username', name: 'username', autocomplete: 'username', required: true, autocapitalize: 'off', spellcheck: 'false' });
  const password = h('input', { id: 'password', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const submit = h('button', { type: 'submit', id: 'login-submit', class: 'primary' }, 'Sign in');
  const notice = h('p', { id: 'dev-notice', class: 'notice', hidden: !session.devMode },
    'Dev mode: the demo repositories are local, so any username and password is accepted. ' +
    'Logs hide the password wherever it appears, as they would a real one: a long one keeps them readable.');
  const form = h('form', { id: 'login-form', class: 'card narrow', novalidate: true },
    h('h1', null, 'Sign in with your Bitbucket credentials'),
    notice,
    h('label', null, 'Username', username),
    h('label', null, 'Password', password),
    error.el,
    status,
    submit);
  root.append(form);
  if (session.reason) {
    error.set(session.reason);
    session.reason = '';
  }
  username.focus();

  const busy = (on) => {
    submit.disabled = on;
    status.textContent = on ? 'Checking your credentials with Bitbucket…' : '';
    status.hidden = !on;
  };
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const user = username.value.trim();
    if (!user || !password.value) {
      error.set('Enter your Bitbucket username and password.');
      (user ? password : username).focus();
      return;
    }
    error.set('');
    busy(true);
    try {
      const answer = await post('/api/login', { username: user, password: password.value });
      password.value = '';
      session.signIn(answer);
      // The session's other facts (the router's URL) come with it.
      try {
        session.signIn(await get('/api/session'));
      } catch {
        // The page works without them; the sandbox page says so where it needs them.
      }
      ctx.navigate(next, { replace: true });
    } catch (err) {
      busy(false);
      password.value = '';
      error.set(err instanceof ApiError ? err.message : String(err));
      password.focus();
    }
  });
}
