// The Valet console's one script: keeps the approvals inbox and the grants table live over
// server-sent events. An approval event makes it fetch the inbox fragment again, a grant event
// that grant's row; either is merged by id, so nothing an operator is typing is replaced, and
// every (re)connect fetches the whole fragment to catch up.
"use strict";

function live(source, fragmentUrl, containerSelector, itemSelector, key, rowUrl) {
  let refreshing = false;
  let again = false;

  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      const answer = await fetch(fragmentUrl, { credentials: "same-origin", cache: "no-store" });
      if (answer.status === 401) { document.body.dataset.live = "logged-out"; return; }
      if (!answer.ok) { return; }
      const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
      merge(fresh.querySelector(containerSelector), document.querySelector(containerSelector));
    } finally {
      refreshing = false;
      if (again) { again = false; refresh(); }
    }
  }

  // Whole: `fresh` is everything, so items it lacks are removed. Otherwise it holds one item to
  // add or replace, and nothing else is touched.
  function merge(fresh, current, partial) {
    if (!fresh || !current) { return; }
    const freshItems = new Map([...fresh.querySelectorAll(itemSelector)].map((item) => [item.getAttribute(key), item]));
    const body = current.querySelector("tbody") || current;
    for (const item of [...current.querySelectorAll(itemSelector)]) {
      const replacement = freshItems.get(item.getAttribute(key));
      if (!replacement) { if (!partial) { item.remove(); } continue; }
      // A row or card being typed into keeps its inputs; its status still updates.
      if (item.contains(document.activeElement) && document.activeElement !== document.body) {
        const status = item.querySelector(".status");
        const freshStatus = replacement.querySelector(".status");
        if (status && freshStatus) { status.textContent = freshStatus.textContent; }
        item.dataset.status = replacement.dataset.status || "";
      } else {
        item.replaceWith(document.importNode(replacement, true));
      }
      freshItems.delete(item.getAttribute(key));
    }
    for (const [, item] of freshItems) {
      const imported = document.importNode(item, true);
      if (body.tagName === "TBODY") { body.prepend(imported); } else { body.append(imported); }
    }
    const empty = current.querySelector(".empty");
    if (empty && current.querySelectorAll(itemSelector).length > 0) { empty.remove(); }
    guardConfirmations(current);
  }

  // One item changed: fetch its row alone, replace it, or add it first when it is new and the
  // server says it matches the filters (204 otherwise).
  async function refreshItem(id) {
    const current = document.querySelector(`${containerSelector} [${key}="${CSS.escape(id)}"]`);
    const answer = await fetch(rowUrl(id, current !== null), { credentials: "same-origin", cache: "no-store" });
    if (answer.status === 401) { document.body.dataset.live = "logged-out"; return; }
    if (answer.status !== 200) { return; }
    const template = document.createElement("template");
    template.innerHTML = "<table><tbody>" + (await answer.text()) + "</tbody></table>";
    const fresh = template.content.querySelector(itemSelector);
    if (!fresh) { return; }
    const wrapper = document.createElement("div");
    wrapper.append(fresh);
    merge(wrapper, document.querySelector(containerSelector), true);
  }

  // Events are coalesced for a fifth of a second (a grant used by many calls changes often);
  // a burst of many grants refreshes the whole fragment once instead.
  const changed = new Set();
  let flushing = null;
  function changedItem(id) {
    changed.add(id);
    if (flushing) { return; }
    flushing = setTimeout(() => {
      flushing = null;
      const ids = [...changed];
      changed.clear();
      if (ids.length > 50) { refresh(); return; }
      for (const item of ids) { refreshItem(item); }
    }, 200);
  }

  const events = new EventSource(source);
  events.addEventListener("open", () => {
    document.body.dataset.live = "connected";
    refresh();
  });
  events.addEventListener("error", () => {
    document.body.dataset.live = "reconnecting";
    // The stream ended for good (the session was ended, expired, or lost its credential): say
    // so when the page itself is refused now.
    if (events.readyState === EventSource.CLOSED) {
      fetch(window.location.href, { credentials: "same-origin" }).then((answer) => {
        if (answer.status === 401) { document.body.dataset.live = "logged-out"; }
      });
    }
  });
  for (const name of ["approval", "grant"]) {
    events.addEventListener(name, (event) => {
      if (!rowUrl) { refresh(); return; }
      let id = null;
      try { id = JSON.parse(event.data).id; } catch (error) { id = null; }
      if (id) { changedItem(id); } else { refresh(); }
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const approvals = document.querySelector("[data-live=approvals]");
  if (approvals) {
    live("/events/approvals", "/approvals?fragment=pending", "#pending", "[data-approval-id]", "data-approval-id");
  }
  const grants = document.querySelector("[data-live=grants]");
  if (grants) {
    const query = grants.dataset.query || "";
    const rowUrl = (id, known) => "/grants/" + encodeURIComponent(id) + "?fragment=row&known=" + (known ? "1" : "0") + "&" + query;
    live("/events/grants?" + query, "/grants?fragment=table&" + query, "#grants", "tr[data-grant-id]", "data-grant-id", rowUrl);
  }
  guardConfirmations(document);
  document.addEventListener("input", (event) => {
    if (event.target.matches("input[data-expected]")) { checkConfirmation(event.target); }
  });
});

// A typed confirmation must match before the approve button is enabled (valetd checks it too).
function checkConfirmation(input) {
  const button = input.form && input.form.querySelector("button[type=submit]");
  if (button) { button.disabled = input.value !== input.dataset.expected; }
}

function guardConfirmations(root) {
  for (const input of root.querySelectorAll("input[data-expected]")) { checkConfirmation(input); }
}
