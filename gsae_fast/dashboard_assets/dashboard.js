// The feature dashboard: an index of every feature and a view per feature, from the data
// scripts in data/ (index.js and vocab.js at load, shard_NNNNN.js when one of its features is
// viewed). Routes: "#" the index, "#q=TEXT" the index searched for TEXT, "#f=ID" feature ID.
// No network, no dependencies.
(function () {
  "use strict";
  var PAGE = 100;                      // index rows per page
  var data = null, vocab = {}, shards = {}, pending = {};
  var state = {query: "", sort: "id", desc: false, page: 0};

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) {
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return e;
  }

  function fail(message) {
    var box = document.getElementById("errors");
    box.hidden = false;
    box.appendChild(el("div", {text: message}));
  }
  window.addEventListener("error", function (ev) { fail("error: " + ev.message); });

  function fmt(x) {
    if (x === null || x === undefined) return "–";
    if (x === 0) return "0";
    var a = Math.abs(x);
    return a >= 1000 || a < 0.001 ? x.toExponential(2) : String(+x.toPrecision(3));
  }
  function pct(x) { return x === 0 ? "0%" : fmt(100 * x) + "%"; }
  // A token as it reads in running text (newlines shown), or with its spaces shown too
  // (a token on its own: chips, logit tables).
  function shown(s, spaces) {
    s = s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/[\x00-\x1f\x7f]/g, function (c) {
      return "\\x" + ("0" + c.charCodeAt(0).toString(16)).slice(-2);
    });
    return spaces ? s.replace(/ /g, "\u2423") : s;
  }
  function tokenText(id, spaces) {
    var s = vocab[id];  // a token without text of its own (a special token) shows its id
    return s === undefined || s === "" ? "<" + id + ">" : shown(s, spaces);
  }

  // ---------------------------------------------------------------------------- the index

  function matches(query) {
    var n = data.density.length, out = [], i;
    if (query === "") { for (i = 0; i < n; i++) out.push(i); return out; }
    if (/^#?\d+$/.test(query)) {
      var id = +query.replace("#", "");
      return id < n ? [id] : [];
    }
    var q = query.toLowerCase();
    for (i = 0; i < n; i++) {
      var toks = data.top_tokens[i];
      for (var j = 0; j < toks.length; j++) {
        if (toks[j].toLowerCase().indexOf(q) >= 0) { out.push(i); break; }
      }
    }
    return out;
  }

  var COLUMNS = [
    {key: "id", label: "Feature", value: function (i) { return i; }},
    {key: "density", label: "Density", value: function (i) { return data.density[i]; }},
    {key: "max", label: "Max activation", value: function (i) { return data.max[i]; }},
    {key: "tokens", label: "Fires most on", cls: "toks",
     value: function (i) { return (data.top_tokens[i][0] || "").trim().toLowerCase(); }}
  ];

  function sorted(ids) {
    var col = COLUMNS.filter(function (c) { return c.key === state.sort; })[0];
    var sign = state.desc ? -1 : 1;
    return ids.sort(function (a, b) {
      var x = col.value(a), y = col.value(b);
      return x < y ? -sign : x > y ? sign : a - b;
    });
  }

  function showIndex() {
    var view = document.getElementById("view");
    view.textContent = "";
    var input = el("input", {type: "search", id: "search", value: state.query,
                             placeholder: "feature id, or a token it fires on"});
    var count = el("span", {cls: "note", id: "count"});
    view.appendChild(el("div", {cls: "controls"}, [input, count]));
    var table = el("table", {id: "features"});
    view.appendChild(table);
    var pager = el("div", {cls: "pager"});
    view.appendChild(pager);
    input.addEventListener("input", function () {
      state.query = input.value.trim();
      state.page = 0;
      // the search is in the address (a link to it works), without a new history entry
      history.replaceState(null, "", state.query ? "#q=" + encodeURIComponent(state.query) : "#");
      fill();
    });

    function fill() {
      var ids = sorted(matches(state.query));
      var pages = Math.max(1, Math.ceil(ids.length / PAGE));
      state.page = Math.min(state.page, pages - 1);
      count.textContent = ids.length + " of " + data.density.length + " features";
      table.textContent = "";
      var head = el("tr");
      COLUMNS.forEach(function (c) {
        var th = el("th", {cls: "sortable" + (c.cls ? " " + c.cls : ""), text: c.label,
                           "data-key": c.key});
        if (c.key === state.sort) th.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
        th.addEventListener("click", function () {
          state.desc = state.sort === c.key ? !state.desc : c.key !== "id" && c.key !== "tokens";
          state.sort = c.key;
          fill();
        });
        head.appendChild(th);
      });
      table.appendChild(el("thead", {}, [head]));
      var body = el("tbody");
      var maxDensity = Math.max.apply(null, data.density.concat([1e-12]));
      ids.slice(state.page * PAGE, (state.page + 1) * PAGE).forEach(function (i) {
        var width = Math.round(60 * data.density[i] / maxDensity);
        var chips = data.top_tokens[i].map(function (t) {
          return el("span", {cls: "chip", text: shown(t, true)});
        });
        body.appendChild(el("tr", {"data-feature": i}, [
          el("td", {}, [el("a", {href: "#f=" + i, text: String(i)})]),
          el("td", {}, [el("span", {cls: "bar", style: "width:" + width + "px"}),
                        pct(data.density[i])]),
          el("td", {text: fmt(data.max[i])}),
          el("td", {cls: "toks"}, chips.length ? chips : [el("span", {cls: "note", text: "never fired"})])
        ]));
      });
      table.appendChild(body);
      if (!ids.length) body.appendChild(el("tr", {}, [el("td", {colspan: 4, cls: "toks note",
        text: "no feature has that id or fires most on a token containing that text"})]));
      pager.textContent = "";
      if (pages > 1) {
        var prev = el("button", {text: "‹ previous"}), next = el("button", {text: "next ›"});
        prev.disabled = state.page === 0;
        next.disabled = state.page === pages - 1;
        prev.addEventListener("click", function () { state.page--; fill(); });
        next.addEventListener("click", function () { state.page++; fill(); });
        pager.appendChild(prev);
        pager.appendChild(el("span", {text: "page " + (state.page + 1) + " of " + pages}));
        pager.appendChild(next);
      }
    }
    fill();
  }

  // ------------------------------------------------------------------------ a feature's view

  function withFeature(id, render) {
    var s = Math.floor(id / data.shard_size);
    var run = function () { render(shards[s][id - s * data.shard_size]); };
    if (shards[s]) return run();
    if (pending[s]) { pending[s].push(run); return; }
    pending[s] = [run];
    var name = "data/shard_" + ("0000" + s).slice(-5) + ".js";
    var tag = el("script", {src: name});
    tag.onerror = function () {
      fail(name + " is missing: the dashboard is incomplete (build it again with gsae-fast features)");
    };
    document.head.appendChild(tag);
  }

  function histogram(counts) {
    var edges = data.edges, first = -1, last = -1;
    counts.forEach(function (c, j) { if (c > 0) { if (first < 0) first = j; last = j; } });
    if (first < 0) return el("p", {cls: "note", text: "no firing activations"});
    var W = 420, H = 140, pad = 22, n = last - first + 1, bw = (W - 2 * pad) / n;
    var top = Math.max.apply(null, counts);
    var ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H + 18);
    function lo(j) { return j === 0 ? 0 : edges[j - 1]; }
    function hi(j) { return j < edges.length ? edges[j] : Infinity; }
    for (var j = first; j <= last; j++) {
      var h = counts[j] ? Math.max(1, (H - 10) * counts[j] / top) : 0;
      var r = document.createElementNS(ns, "rect");
      r.setAttribute("x", pad + (j - first) * bw + 1); r.setAttribute("width", Math.max(1, bw - 2));
      r.setAttribute("y", H - h); r.setAttribute("height", h);
      r.setAttribute("class", "bin");
      var t = document.createElementNS(ns, "title");
      t.textContent = "[" + fmt(lo(j)) + ", " + fmt(hi(j)) + "): " + counts[j] + " tokens";
      r.appendChild(t);
      svg.appendChild(r);
    }
    [fmt(lo(first)), hi(last) === Infinity ? "\u221e" : fmt(hi(last))].forEach(function (text, side) {
      var label = document.createElementNS(ns, "text");
      label.setAttribute("x", side ? W - pad : pad); label.setAttribute("y", H + 13);
      label.setAttribute("text-anchor", side ? "end" : "start");
      label.textContent = text;
      svg.appendChild(label);
    });
    return el("div", {cls: "hist"}, [svg, el("div", {cls: "note",
      text: "activations of the tokens it fires on (log-spaced bins; hover a bar)"})]);
  }

  function logitTable(rows, title, cls) {
    var body = el("tbody", {}, (rows || []).map(function (r) {
      return el("tr", {}, [el("td", {cls: "toks"}, [el("span", {cls: "tok", text: tokenText(r[0], true)})]),
                           el("td", {cls: "v " + cls, text: fmt(r[1])})]);
    }));
    return el("table", {cls: "logits"}, [el("thead", {}, [el("tr", {}, [
      el("th", {cls: "toks", text: title}), el("th", {text: "logit"})])]), body]);
  }

  function contexts(rows, max, id) {
    return el("div", {id: id}, rows.map(function (c) {
      // c = [value, context, position, first position, token ids, activations in thousandths
      // of the feature's max activation]
      var line = el("div", {cls: "ctx", "data-context": c[1]},
                    [el("span", {cls: "val", text: fmt(c[0])})]);
      c[4].forEach(function (tok, j) {
        var p = c[3] + j, a = c[5][j] / 1000, hit = p === c[2];
        var span = el("span", {cls: "t" + (hit ? " hit" : ""), text: tokenText(tok)});
        if (a > 0) span.style.background = "rgba(230, 120, 0, " + Math.min(1, 0.12 + 0.88 * a).toFixed(3) + ")";
        span.title = JSON.stringify(vocab[tok] === undefined ? "<" + tok + ">" : vocab[tok]) +
          "  " + (p === 0 ? "position 0 (not encoded)" : "activation " + fmt(hit ? c[0] : a * max)) +
          "  (context " + c[1] + ", position " + p + ")";
        line.appendChild(span);
      });
      return line;
    }));
  }

  function showFeature(id) {
    var view = document.getElementById("view");
    view.textContent = "";
    var n = data.density.length;
    if (!(id >= 0 && id < n)) { fail("no feature " + id + " (the SAE has " + n + ")"); return; }
    var nav = el("div", {cls: "nav"}, [el("a", {href: "#", text: "← all features"})]);
    if (id > 0) nav.appendChild(el("a", {href: "#f=" + (id - 1), text: "‹ " + (id - 1)}));
    if (id < n - 1) nav.appendChild(el("a", {href: "#f=" + (id + 1), text: (id + 1) + " ›"}));
    view.appendChild(nav);
    view.appendChild(el("h2", {text: "Feature " + id}));
    view.appendChild(el("div", {cls: "stats"}, [
      "density ", el("b", {text: pct(data.density[id])}), " (" + data.firing[id] + " of " +
      data.tokens + " tokens) · max activation ", el("b", {text: fmt(data.max[id])})]));
    var body = el("div", {id: "feature", "data-feature": id}, [el("p", {cls: "note", text: "Loading…"})]);
    view.appendChild(body);
    withFeature(id, function (f) {
      if (location.hash !== "#f=" + id) return;  // another view was opened meanwhile
      body.textContent = "";
      var row = el("div", {cls: "row2"}, [histogram(f.hist)]);
      if (f.pos) {
        row.appendChild(logitTable(f.pos, "promoted tokens", "pos"));
        row.appendChild(logitTable(f.neg, "suppressed tokens", "neg"));
      }
      body.appendChild(row);
      var max = data.max[id] || 1;
      body.appendChild(el("h3", {text: "Top activations"}));
      if (!f.top.length) body.appendChild(el("p", {cls: "note", text: "never fired on the " + data.tokens + " tokens read"}));
      body.appendChild(contexts(f.top, max, "top"));
      var sample = f.sample.slice().sort(function (a, b) { return b[0] - a[0]; });
      body.appendChild(el("h3", {text: "A uniform sample of the tokens it fires on"}));
      body.appendChild(contexts(sample, max, "sample"));
    });
  }

  function route() {
    if (!data) return;
    var m = /^#f=(\d+)$/.exec(location.hash), q = /^#q=(.*)$/.exec(location.hash);
    if (m) { showFeature(+m[1]); return window.scrollTo(0, 0); }
    if (q) { state.query = decodeURIComponent(q[1]); state.page = 0; }
    showIndex();
    window.scrollTo(0, 0);
  }

  window.gsaeDash = {
    index: function (d) { data = d; },
    vocab: function (v) { vocab = v; },
    shard: function (s, rows) {
      shards[s] = rows;
      var waiting = pending[s] || [];
      delete pending[s];
      waiting.forEach(function (run) { run(); });
    },
    missing: function (tag) {
      fail(tag.getAttribute("src") + " is missing: build the dashboard with gsae-fast features");
    },
    start: function () {
      if (!data) { document.getElementById("view").textContent = ""; return; }
      document.getElementById("meta").textContent = data.sae + " · " + data.model + " · " +
        data.layer + " · " + data.d_sae + " features · " + data.tokens + " tokens";
      document.title = "Features of " + data.sae;
      window.addEventListener("hashchange", route);
      route();
    }
  };
})();
