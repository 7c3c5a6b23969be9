/*
 * FedLive: the dashboard's WebSocket client (docs/websocket.md) with polling as the fallback.
 *
 *   const live = FedLive.connect({
 *     trainingIds: [...],             // subscribed after "connected"
 *     onEvent(message) {...},         // every event frame
 *     onState(state) {...},           // "connecting" | "live" | "polling" | "refused"
 *   });
 *   live.subscribe(id); live.close();
 *
 * The socket reconnects with a doubling delay (1 s to 30 s); a 4401 close (not a staff session) is final.
 * Pages poll only while the state is not "live" (and never once their training is finished): in the
 * embedded mode the in-memory channel layer reaches only the process that sent an event, so a page there
 * also polls at a slow pace.
 */
(function () {
  "use strict";

  function randomId() {
    return Array.from(window.crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function connect(options) {
    const subscriptions = new Set(options.trainingIds || []);
    const onEvent = options.onEvent || (() => {});
    const onState = options.onState || (() => {});
    let socket = null;
    let retryDelay = 1000;
    let closed = false;
    let state = "connecting";

    function setState(next) {
      state = next;
      onState(next);
    }

    function send(message) {
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
    }

    function open() {
      const scheme = window.location.protocol === "https:" ? "wss" : "ws";
      try {
        socket = new WebSocket(`${scheme}://${window.location.host}/ws/dashboard-${randomId()}`);
      } catch (error) {
        setState("polling");
        return;
      }
      socket.addEventListener("message", (event) => {
        let message;
        try {
          message = JSON.parse(event.data);
        } catch (error) {
          return;
        }
        if (message.type === "connected") {
          retryDelay = 1000;
          for (const id of subscriptions) send({ action: "subscribe", training_id: id });
          if (!subscriptions.size) setState("live");
        } else if (message.type === "subscribed") {
          setState("live");
        }
        onEvent(message);
      });
      socket.addEventListener("close", (event) => {
        if (closed) return;
        if (event.code === 4401) {
          setState("refused");
          return;
        }
        setState("polling");
        window.setTimeout(open, retryDelay);
        retryDelay = Math.min(retryDelay * 2, 30000);
      });
    }

    open();
    return {
      get state() { return state; },
      subscribe(id) {
        if (subscriptions.has(id)) return;
        subscriptions.add(id);
        send({ action: "subscribe", training_id: id });
      },
      close() {
        closed = true;
        if (socket) socket.close();
      },
    };
  }

  /** Show the connection state in a badge element (role=status is set in the template). */
  function showState(badge, state, pollingText) {
    if (!badge) return;
    const texts = { connecting: "connecting…", live: "live", polling: pollingText || "polling", refused: "not authorised (polling)" };
    badge.className = `badge ${state === "live" ? "live-on" : "live-off"}`;
    badge.textContent = texts[state] || state;
  }

  function csrfToken() {
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    if (input) return input.value;
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  /** fetch JSON with the session and CSRF token; throws an Error carrying the server's message. */
  async function request(url, options) {
    const init = { credentials: "same-origin", headers: { Accept: "application/json" }, ...(options || {}) };
    if (init.method && init.method !== "GET") {
      init.headers = { ...init.headers, "X-CSRFToken": csrfToken() };
      if (init.body !== undefined && typeof init.body !== "string") {
        init.body = JSON.stringify(init.body);
        init.headers["Content-Type"] = "application/json";
      }
    }
    const response = await fetch(url, init);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = (body.error && body.error.message) || body.detail || `HTTP ${response.status}`;
      const error = new Error(message);
      error.status = response.status;
      error.body = body;
      throw error;
    }
    return body;
  }

  /** The <li> of an alert in an alerts list (_alerts_list.html's markup), from an ``alert`` event's
   * ``alert`` or an /api/alerts entry; ``training`` ({id, name}) adds a link to its page. */
  function alertItem(alert, training) {
    const item = document.createElement("li");
    item.dataset.alertId = String(alert.id);
    item.className = `alert severity-${alert.severity}${alert.acknowledged_at ? " acknowledged" : ""}`;
    const label = document.createElement("span");
    label.className = `badge severity-${alert.severity}`;
    label.textContent = alert.severity;
    const time = document.createElement("time");
    time.textContent = (alert.last_seen_at || alert.created_at || new Date().toISOString()).slice(0, 19).replace("T", " ");
    item.append(label, " ", time, " ");
    if (training && training.id) {
      const link = document.createElement("a");
      link.href = `/dashboard/trainings/${training.id}/`;
      link.textContent = training.name || training.id;
      item.append(link, " ");
    }
    const round = alert.round ?? alert.round_number;
    if (round !== null && round !== undefined) {
      const text = document.createElement("span");
      text.className = "muted";
      text.textContent = `round ${round}`;
      item.append(text, " ");
    }
    if (alert.resolved_at) {
      const resolved = document.createElement("span");
      resolved.className = "muted";
      resolved.textContent = "resolved";
      item.append(resolved, " ");
    }
    const message = document.createElement("span");
    message.className = "message";
    message.textContent = alert.message;
    item.append(message);
    return item;
  }

  /**
   * An onState handler for pages whose fallback is a poll: shows the state in ``badge``, polls every 5 s
   * while the socket is not live (and once when it comes back, for what changed meanwhile), and, in the
   * embedded mode (``embedded`` true), every ``embeddedMs`` even while it is live.
   */
  function pollWhileDown({ badge, poll, embedded, embeddedMs = 15000, downMs = 5000 }) {
    let timer = null;
    let wasDown = false;
    return (state) => {
      showState(badge, state);
      if (state === "live" && wasDown) poll();
      wasDown = state !== "live";
      if (timer) window.clearInterval(timer);
      const every = state === "live" ? (embedded ? embeddedMs : 0) : downMs;
      timer = every ? window.setInterval(poll, every) : null;
    };
  }

  window.FedLive = { connect, showState, request, csrfToken, alertItem, pollWhileDown };
})();
