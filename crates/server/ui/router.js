// A small history router: each route is a path pattern and a page. A page is a function
// `(root, ctx)` that draws into `root`; whatever it starts (timers, sockets) it ties to
// `ctx` (`ctx.onCleanup`, `ctx.every`, `ctx.signal`), and all of it ends when the user goes
// to another page. Pages keep their state to themselves.

function compile(pattern) {
  const keys = [];
  const source = pattern
    .split('/')
    .map((seg) => {
      if (seg.startsWith(':')) {
        keys.push(seg.slice(1));
        return '([^/]+)';
      }
      return seg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    })
    .join('/');
  return { re: new RegExp(`^${source}/?$`), keys };
}

export class Router {
  // `routes`: [{path, page, public?, nav?}]; `guard(route, url)` (route null when none
  // matches) may answer another URL to go to instead (the sign-in page, say).
  constructor(root, routes, guard) {
    this.root = root;
    this.routes = routes.map((r) => ({ ...r, ...compile(r.path) }));
    this.guard = guard;
    this.current = null;
    this.first = true;
    window.addEventListener('popstate', () => this.render());
    document.addEventListener('click', (e) => this.onClick(e));
  }

  onClick(e) {
    if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    const a = e.target.closest && e.target.closest('a[href]');
    if (!a || a.target || a.hasAttribute('download') || a.origin !== location.origin) return;
    // The API's own URLs (a log to download) are not pages of the app.
    if (a.pathname.startsWith('/api/') || a.pathname.startsWith('/assets/')) return;
    e.preventDefault();
    this.go(a.pathname + a.search + a.hash);
  }

  go(url, { replace = false } = {}) {
    if (replace) history.replaceState(null, '', url);
    else history.pushState(null, '', url);
    this.render();
  }

  // Changes the query of the current page (its filters) without drawing it again.
  setQuery(params) {
    const url = new URL(location.href);
    for (const [k, v] of Object.entries(params)) {
      if (v) url.searchParams.set(k, v);
      else url.searchParams.delete(k);
    }
    history.replaceState(null, '', url.pathname + url.search + url.hash);
  }

  match(pathname) {
    for (const route of this.routes) {
      const m = route.re.exec(pathname);
      if (!m) continue;
      const params = {};
      try {
        route.keys.forEach((k, i) => { params[k] = decodeURIComponent(m[i + 1]); });
      } catch {
        return null;
      }
      return { route, params };
    }
    return null;
  }

  render() {
    if (this.current) {
      this.current.abort();
      this.current = null;
    }
    const url = new URL(location.href);
    const found = this.match(url.pathname);
    const elsewhere = this.guard(found && found.route, url);
    if (elsewhere) {
      history.replaceState(null, '', elsewhere);
      this.render();
      return;
    }
    const controller = new AbortController();
    const cleanups = [];
    controller.signal.addEventListener('abort', () => cleanups.forEach((fn) => fn()));
    this.current = controller;
    const ctx = {
      params: found.params,
      query: url.searchParams,
      signal: controller.signal,
      navigate: (to, opts) => this.go(to, opts),
      setQuery: (params) => this.setQuery(params),
      onCleanup: (fn) => cleanups.push(fn),
      every: (ms, fn) => {
        const t = setInterval(fn, ms);
        cleanups.push(() => clearInterval(t));
      },
      later: (ms, fn) => {
        const t = setTimeout(fn, ms);
        cleanups.push(() => clearTimeout(t));
      },
      title: (text) => { document.title = text ? `${text} · SDP` : 'SDP'; },
    };
    const page = document.createElement('div');
    page.className = 'page';
    this.root.replaceChildren(page);
    window.scrollTo(0, 0);
    found.route.page(page, ctx);
    document.dispatchEvent(new CustomEvent('sdp:navigated', { detail: { path: url.pathname } }));
    // After a navigation (not the first load), focus goes to the new page's heading, so a
    // screen reader says where the user is.
    if (!this.first) {
      const heading = page.querySelector('h1');
      if (heading) {
        heading.setAttribute('tabindex', '-1');
        heading.focus({ preventScroll: true });
      }
    }
    this.first = false;
  }
}

