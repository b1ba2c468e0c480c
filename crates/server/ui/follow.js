// Follows a log WebSocket (`/ws/deployments/{id}`, `/ws/sandboxes/{id}/logs`): frames are
// numbered by `seq` without gaps, so after a dropped connection it connects again asking for
// the frames after the last one it handed on, and drops any it has had: what it hands on has
// no gap and no repeat. It retries with backoff until the log ends or the page goes away.

import { wsUrl } from './api.js';

// `path(lastSeq)`: the socket's path and query for a (re)connection after `lastSeq`;
// `onFrame(frame)`; `onStatus(kind, text)`, kind one of connecting, live, reconnecting,
// ended, error; `check()`: asked when a connection is refused, it throws the API's reason
// (no such deployment, no session) or returns when it is worth trying again.
export function follow({ path, onFrame, onStatus, check }) {
  let socket = null;
  let lastSeq = 0;
  let ended = false;
  let closed = false;
  let timer = null;
  let delay = 1000;

  const connect = () => {
    if (closed || ended) return;
    let opened = false;
    onStatus(lastSeq ? 'reconnecting' : 'connecting', lastSeq ? 'Connection lost; reconnecting…' : 'Connecting…');
    try {
      socket = new WebSocket(wsUrl(path(lastSeq)));
    } catch (e) {
      onStatus('error', `Cannot open the live log: ${e.message}`);
      return;
    }
    const mine = socket;
    socket.onopen = () => {
      opened = true;
      delay = 1000;
      if (!closed && !ended) onStatus('live', 'Live');
    };
    socket.onmessage = (ev) => {
      if (closed || mine !== socket) return;
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!frame || typeof frame !== 'object') return;
      if (frame.type !== 'end' && typeof frame.seq === 'number') {
        if (frame.seq <= lastSeq) return;
        lastSeq = frame.seq;
      }
      if (frame.type === 'end') {
        ended = true;
        mine.onclose = null;
        mine.close();
      }
      onFrame(frame);
      if (ended) onStatus('ended', '');
    };
    socket.onclose = async () => {
      if (closed || ended || mine !== socket) return;
      socket = null;
      const retry = () => {
        const wait = delay;
        delay = Math.min(delay * 2, 10000);
        onStatus('reconnecting', 'Connection lost; reconnecting…');
        timer = setTimeout(() => { timer = null; connect(); }, wait);
      };
      if (opened) {
        retry();
        return;
      }
      // The upgrade was refused: the API says why (no such log, an expired session).
      try {
        await check();
      } catch (e) {
        if (closed) return;
        if (e.status && e.status < 500) {
          onStatus('error', e.message);
          return;
        }
      }
      if (!closed) retry();
    };
  };

  connect();
  return {
    close() {
      closed = true;
      if (timer) clearTimeout(timer);
      if (socket) {
        socket.onclose = null;
        socket.close();
        socket = null;
      }
    },
  };
}
