// triage-node: the little JavaScript the pages need (no build step, no framework).
"use strict";
window.TriageNode = (function () {
  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // The worklist asks a cheap endpoint (no patient data) whether anything changed and
  // reloads its rows only when it did: new studies and results appear without a reload.
  function pollWorklist() {
    var table = document.getElementById("worklist");
    if (!table) return;
    var body = document.getElementById("worklist-rows");
    var period = parseInt(table.dataset.poll, 10) || 2500;
    var busy = false;
    function tick() {
      if (busy || document.hidden) return;
      busy = true;
      fetch("/api/worklist/fingerprint", { credentials: "same-origin" })
        .then(function (r) { if (r.status === 401) { location.reload(); } return r.json(); })
        .then(function (data) {
          if (!data || data.fingerprint === table.dataset.fingerprint) return null;
          return fetch(table.dataset.rowsUrl, { credentials: "same-origin" }).then(function (r) {
            return r.text().then(function (html) {
              body.innerHTML = html;
              table.dataset.fingerprint = r.headers.get("X-Worklist-Fingerprint") || data.fingerprint;
            });
          });
        })
        .catch(function () { /* try again next time */ })
        .then(function () { busy = false; });
    }
    setInterval(tick, period);
  }

  function overlayToggles() {
    ["mask", "heatmap"].forEach(function (kind) {
      var box = document.getElementById("toggle-" + kind);
      if (!box) return;
      box.addEventListener("change", function () {
        document.querySelectorAll("img.overlay." + kind).forEach(function (img) {
          img.hidden = !box.checked;
        });
      });
    });
  }

  function echoButtons() {
    document.querySelectorAll("button.echo").forEach(function (button) {
      button.addEventListener("click", function () {
        var name = button.dataset.name;
        var out = document.querySelector('.echo-result[data-for="' + name + '"]');
        out.textContent = "…";
        fetch("/api/destinations/" + encodeURIComponent(name) + "/echo", {
          method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf() },
        })
          .then(function (r) { return r.json(); })
          .then(function (d) { out.textContent = (d.ok ? "OK: " : "failed: ") + d.detail; out.className = "echo-result " + (d.ok ? "ok" : "bad"); })
          .catch(function (e) { out.textContent = "failed: " + e; });
      });
    });
  }

  // The status page's studies-per-hour bars: heights set here, not in style attributes
  // (the Content-Security-Policy allows no inline style).
  function hourBars() {
    document.querySelectorAll(".bars span[data-height]").forEach(function (bar) {
      bar.style.height = (parseInt(bar.dataset.height, 10) || 0) + "%";
    });
  }

  // Pages carry no inline script (the Content-Security-Policy allows none): each of these
  // looks for its page's elements and does nothing elsewhere. This script is loaded at the
  // end of <body>, so the page is there.
  pollWorklist();
  overlayToggles();
  echoButtons();
  hourBars();

  return {
    pollWorklist: pollWorklist, overlayToggles: overlayToggles, echoButtons: echoButtons,
    hourBars: hourBars, csrf: csrf,
  };
})();
