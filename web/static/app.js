// cxr-triage web console: small interactions, no library (a hospital network has no CDN).
"use strict";

function csrfToken() {
  const m = document.querySelector('meta[name="csrf-token"]');
  return m ? m.content : "";
}

// Try it: refuse a file over the size limit before uploading it
function initUpload() {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const max = parseInt(form.dataset.maxBytes || "0", 10);
  const input = document.getElementById("file");
  const err = document.getElementById("client-error");
  form.addEventListener("submit", (ev) => {
    const f = input.files && input.files[0];
    if (f && max && f.size > max) {
      ev.preventDefault();
      err.textContent = `The file is ${(f.size / 1048576).toFixed(1)} MiB; the limit is ${(max / 1048576).toFixed(1)} MiB.`;
      err.hidden = false;
    }
  });
}

// Try it: switch the Grad-CAM overlay on and off
function initCamToggle() {
  const box = document.getElementById("show-cam");
  const cam = document.getElementById("cam-image");
  const plain = document.getElementById("plain-image");
  if (!box || !cam || !plain) return;
  const apply = () => {
    cam.hidden = !box.checked;
    plain.hidden = box.checked;
  };
  box.addEventListener("change", apply);
  apply();
}

// Worklist: refresh the rows by themselves
function initWorklistRefresh() {
  const holder = document.getElementById("worklist");
  if (!holder) return;
  const url = holder.dataset.refreshUrl;
  const every = 1000 * parseInt(holder.dataset.refreshSeconds || "10", 10);
  const tick = async () => {
    if (document.hidden) return;
    try {
      const r = await fetch(url, { credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() } });
      if (r.redirected || r.status === 401) {
        window.location.reload(); // the session ended: the page itself goes to the login
        return;
      }
      if (r.ok && r.headers.get("content-type")?.includes("text/html")) {
        holder.innerHTML = await r.text();
        holder.dataset.refreshedAt = new Date().toISOString();
      }
    } catch (e) {
      /* the next tick tries again */
    }
  };
  setInterval(tick, every);
}

document.addEventListener("DOMContentLoaded", () => {
  initUpload();
  initCamToggle();
  initWorklistRefresh();
});
