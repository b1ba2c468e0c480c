// The API client: JSON in and out, errors as ApiError with the server's code and message,
// and one hook for a session that is no longer valid.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let unauthorized = () => {};

// Called with the error of any 401 but a login's: the page that asked need not handle it.
export function onUnauthorized(fn) {
  unauthorized = fn;
}

async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch {
    throw new ApiError(0, 'network', 'Cannot reach the SDP server. Check your connection and try again.');
  }
  if (res.status === 204) return null;
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const e = data && data.error;
    const err = new ApiError(
      res.status,
      (e && e.code) || '',
      (e && e.message) || `The request failed (HTTP ${res.status}).`,
    );
    if (res.status === 401 && path !== '/api/login') unauthorized(err);
    throw err;
  }
  return data;
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body);
export const del = (path) => api('DELETE', path);
export const patch = (path, body) => api('PATCH', path, body);

// `/api/sandboxes/<name>/extend` from its parts, each one a path segment whatever it holds.
export function path(...parts) {
  return parts.map((p, i) => (i === 0 ? p : encodeURIComponent(p))).join('/');
}

// The WebSocket URL of `path` on this server.
export function wsUrl(p) {
  return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + p;
}
