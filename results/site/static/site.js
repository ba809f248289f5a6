/* Hand-written for bench's static leaderboard (no library, no network, works from file://).
   Sorts a table.sortable by a click (or Enter) on a column header: by each cell's data-sort
   (numbers unless the header says data-type="text"), cells without a value last either way;
   a row whose data-parent names another row stays below that row.
   Filters the rows of the table named by a data-filter-text box (label contains the text)
   and a data-filter-kind select (the row's data-kind). The sort and the filters are kept in the
   URL's fragment, so a view is a link. */
(function () {
  "use strict";
  function value(row, i) {
    var cell = row.cells[i];
    if (!cell) return "";
    return cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
  }
  function sortBy(table, i, th, direction) {
    var ascending = direction ? direction === "asc" : th.getAttribute("aria-sort") !== "ascending";
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
  // The page's state lives in its URL's fragment (#sort=table:column:asc&filter=text&kind=derived),
  // so a sorted, filtered view can be bookmarked or sent as a link.
  function column(th, i) { return th.getAttribute("title") || String(i); }
  function remember(key, value) {
    var state = new URLSearchParams(location.hash.slice(1));
    if (value) state.set(key, value); else state.delete(key);
    history.replaceState(null, "", "#" + state.toString());
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      function sortHere() {
        sortBy(table, i, th);
        var dir = th.getAttribute("aria-sort") === "ascending" ? "asc" : "desc";
        remember("sort", table.id + ":" + column(th, i) + ":" + dir);
      }
      th.tabIndex = 0;
      th.addEventListener("click", sortHere);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortHere(); });
    });
  });
  document.querySelectorAll("[data-filter-text], [data-filter-kind]").forEach(function (control) {
    var id = control.getAttribute("data-filter-text") || control.getAttribute("data-filter-kind");
    var key = control.hasAttribute("data-filter-text") ? "filter" : "kind";
    function update() { applyFilters(id); remember(key, control.value.trim()); }
    control.addEventListener("input", update);
    control.addEventListener("change", update);
  });
  var state = new URLSearchParams(location.hash.slice(1));
  var sort = (state.get("sort") || "").split(":");
  var table = sort.length >= 3 ? document.getElementById(sort[0]) : null;
  if (table && table.tHead) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      if (column(th, i) === sort.slice(1, -1).join(":")) sortBy(table, i, th, sort[sort.length - 1]);
    });
  }
  [["filter", "data-filter-text"], ["kind", "data-filter-kind"]].forEach(function (pair) {
    var value = state.get(pair[0]);
    document.querySelectorAll("[" + pair[1] + "]").forEach(function (control) {
      if (value === null) return;
      control.value = value;
      applyFilters(control.getAttribute(pair[1]));
    });
  });
})();
