// llmq web: refreshes the page's live part (#live) every few seconds without a reload.
// The new part comes from this same server, whose pages escape every text they show; it is
// parsed inert (DOMParser runs no script) and swapped in. Nothing else on the page changes,
// so a form being filled in is left alone.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) return;
  var every = Number(live.getAttribute("data-refresh")) || 3000;
  function refresh() {
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) return;
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        var now = document.getElementById("live");
        if (fresh && now) now.replaceWith(document.importNode(fresh, true));
      })
      .catch(function () { /* the server is away: try again next time */ })
      .finally(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
})();
