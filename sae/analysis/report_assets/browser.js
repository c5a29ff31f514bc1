// Sorting and filtering for the feature browser, with no server and no library.
// State lives in the URL hash, e.g. #sort=density:desc&filter.ii=>-0.3&filter.is_curve=true,
// so a link (or a headless browser) opens the page already sorted and filtered.
(function () {
  "use strict";
  const table = document.querySelector("table.units");
  if (!table) return;
  const body = table.tBodies[0];
  const headers = Array.from(table.querySelectorAll("tr.names th"));
  const inputs = Array.from(table.querySelectorAll("tr.filters input"));
  const rows = Array.from(body.rows);
  const state = { sort: null, dir: "asc", filters: {} };

  function cellValue(row, index) {
    const cell = row.cells[index];
    const raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
    return raw;
  }

  function numeric(index) { return headers[index].dataset.type === "number"; }

  const { matches, compare } = window.TableRules;  // table.js

  function render() {
    let shown = rows.filter(row => headers.every((h, i) =>
      matches(cellValue(row, i), state.filters[h.dataset.key], numeric(i))));
    const index = headers.findIndex(h => h.dataset.key === state.sort);
    if (index >= 0) {
      const sign = state.dir === "desc" ? -1 : 1;
      shown.sort((r, s) => {
        const c = compare(cellValue(r, index), cellValue(s, index), numeric(index));
        const va = parseFloat(cellValue(r, index)), vb = parseFloat(cellValue(s, index));
        if (numeric(index) && (isNaN(va) || isNaN(vb))) return c;  // NaNs stay last
        return sign * c;
      });
    }
    const visible = new Set(shown);
    rows.forEach(row => { row.hidden = !visible.has(row); });
    shown.forEach(row => body.appendChild(row));
    headers.forEach((h, i) => {
      h.classList.toggle("sorted-asc", i === index && state.dir === "asc");
      h.classList.toggle("sorted-desc", i === index && state.dir === "desc");
    });
    const count = document.getElementById("count");
    if (count) count.textContent = shown.length + " of " + rows.length + " shown";
  }

  function writeHash() {
    const parts = [];
    if (state.sort) parts.push("sort=" + encodeURIComponent(state.sort) + ":" + state.dir);
    Object.entries(state.filters).forEach(([k, v]) => { if (v) parts.push("filter." + k + "=" + encodeURIComponent(v)); });
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname);
  }

  function readHash() {
    decodeURIComponent(location.hash.slice(1)).split("&").forEach(part => {
      const eq = part.indexOf("=");
      if (eq < 0) return;
      const key = part.slice(0, eq), value = part.slice(eq + 1);
      if (key === "sort") {
        const [column, dir] = value.split(":");
        state.sort = column;
        state.dir = dir === "desc" ? "desc" : "asc";
      } else if (key.startsWith("filter.")) {
        state.filters[key.slice(7)] = value;
      }
    });
    inputs.forEach(input => { input.value = state.filters[input.dataset.key] || ""; });
  }

  headers.forEach(h => h.addEventListener("click", () => {
    if (state.sort === h.dataset.key) state.dir = state.dir === "asc" ? "desc" : "asc";
    else { state.sort = h.dataset.key; state.dir = numeric(headers.indexOf(h)) ? "desc" : "asc"; }
    writeHash();
    render();
  }));
  inputs.forEach(input => input.addEventListener("input", () => {
    state.filters[input.dataset.key] = input.value.trim();
    writeHash();
    render();
  }));
  readHash();
  render();
})();
