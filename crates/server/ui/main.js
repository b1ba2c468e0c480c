// The app's entry: what the server says of itself, the session, the routes, the header.

import { get, onUnauthorized, post } from './api.js';
import agentsPage from './page-agents.js';
import deploymentPage from './page-deployment.js';
import hooksPage from './page-hooks.js';
import loginPage, { safeNext } from './page-login.js';
import newSandboxPage from './page-new.js';
import sandboxPage from './page-sandbox.js';
import sandboxesPage from './page-sandboxes.js';
import { Router } from './router.js';
import { session } from './session.js';

const routes = [
  { path: '/', page: sandboxesPage },
  { path: '/login', page: loginPage, public: true },
  { path: '/sandboxes', page: sandboxesPage, nav: '/sandboxes' },
  { path: '/new', page: newSandboxPage, nav: '/new' },
  { path: '/sandboxes/:name', page: sandboxPage, nav: '/sandboxes' },
  { path: '/deployments/:id', page: deploymentPage, nav: '/sandboxes' },
  { path: '/agents', page: agentsPage, nav: '/agents' },
  { path: '/hooks', page: hooksPage, nav: '/hooks' },
];

const here = () => location.pathname + location.search + location.hash;

const router = new Router(document.getElementById('main'), routes, (route, url) => {
  // The server answers only the app's own paths with the app; anything else is its home.
  if (!route) return '/sandboxes';
  if (route.public) {
    // Signed in already: on to where the user was going.
    return session.signedIn ? safeNext(url.searchParams.get('next')) : null;
  }
  if (!session.signedIn) {
    const next = url.pathname + url.search + url.hash;
    return next === '/' ? '/login' : `/login?next=${encodeURIComponent(next)}`;
  }
  return null;
});

onUnauthorized((err) => {
  if (!session.signedIn) return;
  session.signOut(err.code === 'session_expired' ? 'Your session has expired. Please sign in again.' : err.message);
  router.go(`/login?next=${encodeURIComponent(here())}`, { replace: true });
});

const nav = document.getElementById('nav');
const who = document.getElementById('session');
session.onChange(() => {
  nav.hidden = !session.signedIn;
  who.hidden = !session.signedIn;
  document.getElementById('whoami').textContent = session.signedIn ? `Signed in as ${session.user}` : '';
});
document.addEventListener('sdp:navigated', () => {
  const found = router.match(location.pathname);
  const current = found && found.route.nav;
  for (const a of nav.querySelectorAll('a')) {
    if (a.getAttribute('href') === current) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
});

document.getElementById('logout').addEventListener('click', async (e) => {
  const button = e.currentTarget;
  button.disabled = true;
  try {
    await post('/api/logout');
  } catch {
    // Signed out here whatever the server said: the cookie may be gone already.
  }
  button.disabled = false;
  session.signOut('');
  router.go('/login', { replace: true });
});

async function start() {
  const [health, current] = await Promise.allSettled([get('/api/health'), get('/api/session')]);
  if (health.status === 'fulfilled' && health.value) {
    const h = health.value;
    session.devMode = h.mode === 'dev';
    session.version = String(h.version || '');
    document.getElementById('footer').textContent = `SDP ${session.version}${h.mode ? ` · ${h.mode} mode` : ''}`;
  }
  if (current.status === 'fulfilled' && current.value) session.signIn(current.value);
  else session.signOut('');
  router.render();
}

start();
