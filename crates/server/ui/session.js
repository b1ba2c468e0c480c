// The one state the pages share: who is signed in, what the server said of itself, and
// why the last session ended. Everything else belongs to the page that shows it.

const listeners = new Set();

export const session = {
  user: '',
  expiresAt: '',
  gatewayUrl: '',
  devMode: false,
  version: '',
  // Why the user was sent to the sign-in page (a session that expired), shown there once.
  reason: '',

  get signedIn() {
    return this.user !== '';
  },

  signIn(info) {
    this.user = String(info.user || '');
    this.expiresAt = String(info.expires_at || '');
    if (info.gateway_url) this.gatewayUrl = String(info.gateway_url);
    this.reason = '';
    changed();
  },

  signOut(reason) {
    this.user = '';
    this.expiresAt = '';
    this.reason = reason || '';
    changed();
  },

  // Whether `owner` is the signed-in user (user names compare without case, as the server's).
  owns(owner) {
    return this.signedIn && String(owner || '').toLowerCase() === this.user.toLowerCase();
  },

  onChange(fn) {
    listeners.add(fn);
  },
};

function changed() {
  for (const fn of listeners) fn(session);
}
