// llmq web: refreshes the page's live part (#live) every few seconds without a reload, and
// asks to confirm an action whose button says so (data-confirm).
// The new part comes from this same server, whose pages escape every text they show; it is
// parsed inert (DOMParser runs no script) and swapped in. Nothing else on the page changes,
// and a part being written in waits. A hidden tab asks nothing until it is shown.
(function () {
  "use strict";
  document.addEventListener("submit", function (e) {
    var button = e.submitter;
    var ask = button && button.getAttribute("data-confirm");
    if (ask && !window.confirm(ask)) e.preventDefault();
  });
  var live = document.getElementById("live");
  // A part marked data-done (a task that ended) never changes again.
  if (!live || live.hasAttribute("data-done")) return;
  var done = false;
  var every = Number(live.getAttribute("data-refresh")) || 3000;
  function later() { if (!done) window.setTimeout(refresh, every); }
  // Something typed in the live part (a note) is not thrown away: wait until it is sent.
  function typing() {
    var now = document.getElementById("live");
    if (!now) return false;
    var inputs = now.querySelectorAll("input, textarea");
    for (var i = 0; i < inputs.length; i++) {
      var f = inputs[i];
      if (f === document.activeElement || (f.type !== "hidden" && f.type !== "checkbox" && f.value !== f.defaultValue)) return true;
      if (f.type === "checkbox" && f.checked !== f.defaultChecked) return true;
    }
    return false;
  }
  function refresh() {
    if (typing()) { later(); return; }
    if (document.hidden) {
      document.addEventListener("visibilitychange", refresh, { once: true });
      return;
    }
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) return;
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        var now = document.getElementById("live");
        if (fresh && now) now.replaceWith(document.importNode(fresh, true));
        done = Boolean(fresh && fresh.hasAttribute("data-done"));
      })
      .catch(function () { /* the server is away: try again next time */ })
      .finally(later);
  }
  later();
})();
