// Runs in <head>, before the page paints: apply the saved theme (else the system's) so that a dark
// page never flashes white.
"use strict";
(function () {
  let theme = null;
  try { theme = localStorage.getItem("llamaherd.theme"); } catch (e) { /* storage disabled */ }
  if (theme !== "light" && theme !== "dark") {
    theme = window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }
  document.documentElement.dataset.theme = theme;
})();
