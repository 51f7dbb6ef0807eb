"use strict";
// the OpenAPI page, from the vendored swagger-ui-dist (no CDN)
window.addEventListener("load", () => {
  const el = document.getElementById("swagger-ui");
  if (!el || !window.SwaggerUIBundle) return;
  window.ui = window.SwaggerUIBundle({ url: el.dataset.specUrl, dom_id: "#swagger-ui" });
});
