// Filtering and ordering of table values, shared by the evaluation report's tables (browser.js) and the
// feature browser's index (index.js). A value is a number, a numeric string, text, or missing (null, "NaN").
window.TableRules = (function () {
  "use strict";
  function number(value) { return value === null || value === undefined ? NaN : parseFloat(value); }

  // Number filters: "0.5" (equal), ">0.5", ">=0.5", "<0.5", "<=0.5", "0.1..0.5" (inclusive range).
  // Text filters: a case-insensitive substring.
  function matches(value, filter, isNumber) {
    if (!filter) return true;
    if (!isNumber) return String(value ?? "").toLowerCase().includes(filter.toLowerCase());
    const x = number(value);
    const range = filter.split("..");
    if (range.length === 2) return x >= parseFloat(range[0]) && x <= parseFloat(range[1]);
    const m = filter.match(/^(>=|<=|>|<|=)?\s*(-?[\d.eE+-]+|nan)$/);
    if (!m) return true;
    const y = parseFloat(m[2]);
    switch (m[1]) {
      case ">": return x > y;
      case ">=": return x >= y;
      case "<": return x < y;
      case "<=": return x <= y;
      default: return isNaN(y) ? isNaN(x) : x === y;
    }
  }

  function compare(a, b, isNumber) {
    if (!isNumber) return String(a ?? "").localeCompare(String(b ?? ""));
    const x = number(a), y = number(b);
    if (isNaN(x) && isNaN(y)) return 0;
    if (isNaN(x)) return 1;  // missing values sort last either way
    if (isNaN(y)) return -1;
    return x - y;
  }

  return { matches, compare };
})();
