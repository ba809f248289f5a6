/* Hand-written for bench's static leaderboard (no library, no network, works from file://).
   Sorts a table.sortable by a click (or Enter) on a column header: by each cell's data-sort
   (numbers unless the header says data-type="text"), cells without a value last either way;
   a row whose data-parent names another row stays below that row.
   Filters the rows of the table named by a data-filter-text box (label contains the text)
   and a data-filter-kind select (the row's data-kind). */
(function () {
  "use strict";
  function value(row, i) {
    var cell = row.cells[i];
    if (!cell) return "";
    return cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
  }
  function sortBy(table, i, th) {
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var numeric = th.getAttribute("data-type") !== "text";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    // A derived row (data-parent names its method's row) moves with its parent, below it.
    var groups = {}, heads = [];
    Array.prototype.forEach.call(body.rows, function (row) {
      var parent = row.getAttribute("data-parent") || row.getAttribute("data-label") || "";
      if (!groups[parent]) { groups[parent] = []; heads.push(parent); }
      if (row.getAttribute("data-label") === parent) groups[parent].unshift(row); else groups[parent].push(row);
    });
    heads.sort(function (p, q) {
      var x = value(groups[p][0], i), y = value(groups[q][0], i);
      if (numeric) { x = x === "" ? NaN : parseFloat(x); y = y === "" ? NaN : parseFloat(y); }
      var xMissing = numeric ? isNaN(x) : x === "", yMissing = numeric ? isNaN(y) : y === "";
      if (xMissing || yMissing) return xMissing - yMissing;
      var d = numeric ? x - y : String(x).localeCompare(String(y));
      return ascending ? d : -d;
    });
    heads.forEach(function (p) { groups[p].forEach(function (row) { body.appendChild(row); }); });
  }
  function applyFilters(id) {
    var table = document.getElementById(id);
    var text = document.querySelector('[data-filter-text="' + id + '"]');
    var kind = document.querySelector('[data-filter-kind="' + id + '"]');
    var needle = text ? text.value.trim().toLowerCase() : "";
    var wanted = kind ? kind.value : "";
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      var label = (row.getAttribute("data-label") || "").toLowerCase();
      var shown = label.indexOf(needle) !== -1 && (!wanted || row.getAttribute("data-kind") === wanted);
      row.hidden = !shown;
    });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(table, i, th); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortBy(table, i, th); });
    });
  });
  document.querySelectorAll("[data-filter-text], [data-filter-kind]").forEach(function (control) {
    var id = control.getAttribute("data-filter-text") || control.getAttribute("data-filter-kind");
    control.addEventListener("input", function () { applyFilters(id); });
    control.addEventListener("change", function () { applyFilters(id); });
  });
})();
