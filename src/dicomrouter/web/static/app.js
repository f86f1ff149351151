// The dashboard's own behaviour, here and not inline: the Content-Security-Policy
// allows scripts from this server only (no inline handlers, no eval).
"use strict";

// "Select all" in a jobs table.
document.addEventListener("change", (event) => {
  const box = event.target;
  if (box instanceof HTMLInputElement && box.classList.contains("select-all")) {
    for (const c of document.querySelectorAll("input.sel")) c.checked = box.checked;
  }
});

// A self-refreshing list waits while jobs are selected (a refresh would drop them).
document.addEventListener("htmx:beforeRequest", (event) => {
  const source = event.detail && event.detail.elt;
  if (source && source.hasAttribute("data-pause-when-selected")
      && document.querySelector("input.sel:checked")) {
    event.preventDefault();
  }
});

// A part of a page that refreshes itself keeps what the user opened (a study
// trace's per-instance list, say) open.
let openDetails = [];
document.addEventListener("htmx:beforeSwap", () => {
  openDetails = [...document.querySelectorAll("details[id][open]")].map((d) => d.id);
});
document.addEventListener("htmx:afterSwap", () => {
  for (const id of openDetails) {
    const details = document.getElementById(id);
    if (details) details.open = true;
  }
});
