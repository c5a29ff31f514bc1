// The browser's index: draws UNITS (set by features.js / neurons.js) as a table a page at a time, so that
// thousands of units load at once. Search by id, sort by a column, filter columns; the state lives in the URL
// hash (#q=12,40-50&sort=density:desc&filter.ii_lpips=>-0.3&page=2), so a view is a link.
(function () {
  "use strict";
  const data = window.UNITS;
  if (!data) return;
  const PAGE = 50;
  const columns = data.columns;
  const rows = data.rows;
  const table = document.querySelector("table.units");
  const body = table.tBodies[0];
  const state = { q: "", sort: data.sort || null, dir: data.dir || "desc", filters: {}, page: 1 };

  // Header: names (click to sort) and a filter box under each sortable column.
  const names = table.querySelector("tr.names"), filters = table.querySelector("tr.filters");
  columns.forEach(c => {
    const th = document.createElement("th");
    th.textContent = c.label; th.title = c.title || c.label; th.dataset.key = c.key;
    names.appendChild(th);
    const f = document.createElement("th");
    if (c.type === "number" || c.type === "text") {
      const input = document.createElement("input");
      input.dataset.key = c.key;
      input.placeholder = c.type === "number" ? ">0, a..b" : "text";
      f.appendChild(input);
    }
    filters.appendChild(f);
  });
  const headers = Array.from(names.children);
  const inputs = Array.from(filters.querySelectorAll("input"));
  const search = document.getElementById("search");

  // Ids: "12", "3,17,42", "100-200" (inclusive), or any mix.
  function idMatcher(text) {
    const parts = text.split(/[\s,]+/).filter(Boolean);
    if (!parts.length) return null;
    const tests = parts.map(p => {
      const m = p.match(/^(\d+)\s*-\s*(\d+)$/);
      if (m) { const a = +m[1], b = +m[2]; return id => id >= a && id <= b; }
      const n = parseInt(p, 10);
      return isNaN(n) ? (() => false) : (id => id === n);
    });
    return id => tests.some(t => t(id));
  }

  const { matches, compare } = window.TableRules;  // table.js

  function sparkline(values, marker) {
    if (!values || !values.length) return "";
    const w = 96, h = 24, lo = Math.min(...values), hi = Math.max(...values), span = (hi - lo) || 1;
    const step = w / Math.max(1, values.length - 1);
    const pts = values.map((v, i) => (i * step).toFixed(0) + "," + (h - 1 - (v - lo) / span * (h - 2)).toFixed(0));
    const mark = marker === null || marker === undefined ? "" :
      `<line x1="${marker / 360 * w}" y1="0" x2="${marker / 360 * w}" y2="${h}" stroke="#d33"/>`;
    return `<svg width="${w}" height="${h}">${mark}<polyline fill="none" stroke="#246" points="${pts.join(" ")}"/></svg>`;
  }

  function format(value, c) {
    if (value === null || value === undefined || (typeof value === "number" && isNaN(value))) return "–";
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(c.digits || 4).replace(/\.?0+(e|$)/, "$1");
    return String(value);
  }

  function cell(row, c) {
    const td = document.createElement("td");
    const v = row[c.key];
    if (c.type === "link") {
      td.innerHTML = `<a href="${row.page}">${v}</a>`;
    } else if (c.type === "image" || c.type === "examples") {
      td.className = c.type === "image" ? "image" : "image examples";
      if (v) td.innerHTML = `<a href="${row.page}"><img loading="lazy" src="${v}" alt=""></a>`;
    } else if (c.type === "spark") {
      td.innerHTML = sparkline(v, row.is_curve === "yes" ? row.preferred_orientation : null);
    } else {
      td.textContent = format(v, c);
      if (c.type === "number") td.dataset.value = v === null || v === undefined ? "NaN" : v;
    }
    return td;
  }

  function selected() {
    const ids = idMatcher(state.q);
    let shown = rows.filter(r => (!ids || ids(r.id)) &&
      columns.every(c => matches(r[c.key], state.filters[c.key], c.type === "number")));
    const c = columns.find(c => c.key === state.sort);
    if (c) {
      const sign = state.dir === "desc" ? -1 : 1;
      const type = c.type === "link" ? "number" : c.type;  // the id column sorts as a number
      shown.sort((a, b) => {
        const x = a[c.key], y = b[c.key];
        const missing = type === "number" && (x === null || y === null || x === undefined || y === undefined);
        return missing ? compare(x, y, type === "number") : sign * compare(x, y, type === "number") || a.id - b.id;
      });
    }
    return shown;
  }

  function render() {
    const shown = selected();
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    state.page = Math.min(Math.max(1, state.page), pages);
    const slice = shown.slice((state.page - 1) * PAGE, state.page * PAGE);
    const fragment = document.createDocumentFragment();
    slice.forEach(r => {
      const tr = document.createElement("tr");
      tr.dataset.id = r.id;
      columns.forEach(c => tr.appendChild(cell(r, c)));
      fragment.appendChild(tr);
    });
    body.replaceChildren(fragment);
    headers.forEach(h => {
      h.classList.toggle("sorted-asc", h.dataset.key === state.sort && state.dir === "asc");
      h.classList.toggle("sorted-desc", h.dataset.key === state.sort && state.dir === "desc");
    });
    document.getElementById("count").textContent =
      `${shown.length} of ${rows.length} shown` + (pages > 1 ? `, page ${state.page} of ${pages}` : "");
    const pager = document.getElementById("pager");
    pager.replaceChildren();
    const button = (label, page) => {
      const b = document.createElement("button");
      b.textContent = label; b.disabled = page < 1 || page > pages || page === state.page;
      b.addEventListener("click", () => { state.page = page; update(); window.scrollTo(0, table.offsetTop - 40); });
      pager.appendChild(b);
    };
    button("« first", 1); button("‹ prev", state.page - 1); button("next ›", state.page + 1); button("last »", pages);
  }

  function writeHash() {
    const parts = [];
    if (state.q) parts.push("q=" + encodeURIComponent(state.q));
    if (state.sort) parts.push("sort=" + encodeURIComponent(state.sort) + ":" + state.dir);
    Object.entries(state.filters).forEach(([k, v]) => { if (v) parts.push("filter." + k + "=" + encodeURIComponent(v)); });
    if (state.page > 1) parts.push("page=" + state.page);
    history.replaceState(null, "", "#" + parts.join("&"));
  }

  function readHash() {
    location.hash.slice(1).split("&").forEach(part => {
      const eq = part.indexOf("=");
      if (eq < 0) return;
      const key = part.slice(0, eq), value = decodeURIComponent(part.slice(eq + 1));
      if (key === "sort") {
        const [column, dir] = value.split(":");
        state.sort = column; state.dir = dir === "asc" ? "asc" : "desc";
      } else if (key === "q") state.q = value;
      else if (key === "page") state.page = parseInt(value, 10) || 1;
      else if (key.startsWith("filter.")) state.filters[key.slice(7)] = value;
    });
    inputs.forEach(input => { input.value = state.filters[input.dataset.key] || ""; });
    search.value = state.q;
  }

  function update() { writeHash(); render(); }

  headers.forEach(h => h.addEventListener("click", () => {
    const c = columns.find(c => c.key === h.dataset.key);
    if (!c || !(c.type === "number" || c.type === "text" || c.type === "link")) return;
    if (state.sort === c.key) state.dir = state.dir === "asc" ? "desc" : "asc";
    else { state.sort = c.key; state.dir = c.type === "number" ? "desc" : "asc"; }
    state.page = 1; update();
  }));
  inputs.forEach(input => input.addEventListener("input", () => {
    state.filters[input.dataset.key] = input.value.trim(); state.page = 1; update();
  }));
  search.addEventListener("input", () => { state.q = search.value.trim(); state.page = 1; update(); });
  search.addEventListener("keydown", e => {  // Enter on a single id opens its page
    if (e.key !== "Enter") return;
    const shown = selected();
    if (shown.length === 1) location.href = shown[0].page;
  });

  // Plots open full-size on click.
  const box = document.getElementById("lightbox");
  document.querySelectorAll(".figures img").forEach(img => img.addEventListener("click", e => {
    e.preventDefault(); box.querySelector("img").src = img.src; box.classList.add("open");
  }));
  box.addEventListener("click", () => box.classList.remove("open"));
  document.addEventListener("keydown", e => { if (e.key === "Escape") box.classList.remove("open"); });

  if (location.hash.length > 1) readHash();
  else {  // no view in the URL: the page's default (e.g. only the units with a feature visualization)
    Object.assign(state.filters, data.filters || {});
    inputs.forEach(input => { input.value = state.filters[input.dataset.key] || ""; });
  }
  render();
})();
