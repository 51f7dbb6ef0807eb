"use strict";
// the OpenAPI page, from the vendored swagger-ui-dist (no CDN)
window.addEventListener("load", () => {
  const el = document.getElementById("swagger-ui");
  if (!el || !window.SwaggerUIBundle) return;
  const meta = document.querySelector('meta[name="csrf-token"]');
  window.ui = window.SwaggerUIBundle({
    url: el.dataset.specUrl,
    dom_id: "#swagger-ui",
    // "Try it out" from this page runs on the session: it needs the CSRF token
    requestInterceptor: (req) => {
      if (meta) req.headers["X-CSRF-Token"] = meta.content;
      return req;
    },
  });
});
