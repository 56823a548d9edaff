// evoforge dashboard: every page fetches JSON from /api and builds its DOM with textContent only,
// so nothing a run stores (recipes, task names, errors) is ever parsed as HTML. Plot labels go
// through esc(): plotly renders a subset of HTML in hover text.
// One page for every address: links and clicks move between pages with the History API, so
// plotly is compiled once per tab; it loads beside a page's data, never before it.
"use strict";

const POLL_MS = 2000;
const DOMINATED_SHOWN = 5000;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function esc(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// -- pages and their lifetime ---------------------------------------------------------------

let current = null;  // the page on screen (see render)

function aborted(error) {
  return error && error.name === "AbortError";
}

let plotlyLoading = null;

function plotly() {
  // the script tag is added on first use: the runs page draws without it, then preloads it
  if (!plotlyLoading) {
    plotlyLoading = new Promise((resolve, reject) => {
      const script = el("script", {src: "/static/plotly.min.js"});
      script.addEventListener("load", () => resolve(window.Plotly));
      script.addEventListener("error", () => reject(new Error("could not load plotly.min.js")));
      document.head.append(script);
    });
  }
  return plotlyLoading;
}

async function getJSON(url, signal) {
  const response = await fetch(url, {cache: "no-store", signal});
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

const enc = encodeURIComponent;
const runHref = (run) => `/runs/${enc(run)}`;
const individualHref = (run, id) => `/runs/${enc(run)}/individuals/${enc(id)}`;

function isShare(name) { return name.startsWith("accuracy") || name.startsWith("score"); }

function fmtNumber(name, value) {
  if (value === null || value === undefined) return "–";
  if (isShare(name)) return `${(100 * value).toFixed(1)} %`;
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en");
  return Number(value).toPrecision(4);
}

function fmt(name, pair) {
  if (!pair) return "–";
  const [value, stderr] = pair;
  if (value === null) return "–";
  if (!stderr) return fmtNumber(name, value);
  const spread = isShare(name) ? (100 * stderr).toFixed(1) : Number(stderr).toPrecision(2);
  return `${fmtNumber(name, value)} ± ${spread}`;
}

function fmtTime(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString("en-GB") : "–";
}

function table(headers, rows, attrs = {}) {
  return el("table", attrs, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))));
}

function crumbs(...parts) {
  const holder = document.getElementById("crumbs");
  holder.replaceChildren(...parts.flatMap((part) => [" / ", part]));
}

function fail(error) {
  if (aborted(error)) return;  // the page was left while it loaded
  document.getElementById("main").replaceChildren(el("p", {class: "error"}, `error: ${error.message}`));
}

function costLine(cost) {
  const asked = cost.items_asked || {};
  const search = Object.entries(asked).filter(([s]) => s !== "test").reduce((a, [, n]) => a + n, 0);
  if (!search) return "fitness cost: nothing asked yet";
  const ratio = cost.items_if_full ? `, ${(cost.items_if_full / search).toFixed(1)}× fewer than ` +
    `evaluating every candidate fully (${cost.items_if_full.toLocaleString("en")})` : "";
  return `fitness cost: ${search.toLocaleString("en")} items asked on the search split${ratio}`;
}

const PLOT_CONFIG = {displaylogo: false, responsive: true};
const LAYOUT = {margin: {l: 60, r: 20, t: 30, b: 50}, hovermode: "closest",
  paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "#fbfbfb"};

// -- runs -----------------------------------------------------------------------------------

async function runsPage(view) {
  document.title = "evoforge runs";
  crumbs("runs");
  const main = document.getElementById("main");
  const selected = new Set();
  async function draw() {
    const {runs} = await view.get("/api/runs");
    const compare = el("button", {id: "compare", onclick: () => {
      navigate("/compare?" + [...selected].map((r) => `run=${enc(r)}`).join("&"));
    }}, "compare selected");
    const rows = runs.map((r) => [
      el("input", {type: "checkbox", "aria-label": `select ${r.run}`, onchange: (e) => {
        if (e.target.checked) selected.add(r.run); else selected.delete(r.run);
      }, ...(selected.has(r.run) ? {checked: ""} : {})}),
      el("a", {href: runHref(r.run), class: "run-link"}, r.run),
      el("span", {class: `state state-${r.state.split(/[: ]/)[0]}`}, r.state),
      r.strategy, `${r.generations.done} / ${r.generations.planned}`,
      r.individuals.toLocaleString("en"),
      r.best_test ? el("a", {href: individualHref(r.run, r.best_test.id)},
        `${fmt(r.best_test.objective, r.best_test.value)} (${r.best_test.id})`) : "–",
      r.hypervolume === null ? "–" : r.hypervolume.toFixed(4),
      fmtTime(r.started), fmtTime(r.updated),
    ]);
    main.replaceChildren(el("h1", {}, "Runs"),
      runs.length ? table(["", "run", "status", "strategy", "generations", "individuals",
        "best held-out", "hypervolume", "started", "updated"], rows, {id: "runs"})
        : el("p", {class: "muted"}, "No runs here yet: start one with `evoforge run`."),
      compare);
  }
  await draw();
  view.every(5 * POLL_MS, () => draw().catch(fail));
  const preload = () => plotly().catch(() => {});  // a run's page then opens without the wait
  if (window.requestIdleCallback) requestIdleCallback(preload); else setTimeout(preload, 200);
}

// -- a run ----------------------------------------------------------------------------------

async function runPage(view) {
  const run = decodeURIComponent(location.pathname.split("/")[2]);
  document.title = `${run} · evoforge`;
  crumbs(el("a", {href: runHref(run)}, run));
  const main = document.getElementById("main");
  const loading = plotly();
  let data = await view.get(`/api/runs/${enc(run)}`);
  const generations = () => data.generations.map((g) => g.generation);
  const names = data.objectives;
  const own = Object.keys(data.plan.objectives);
  // tens of thousands of grey points cost seconds to draw: past DOMINATED_SHOWN they start hidden
  const state = {x: own[1] || "params", y: own[0], dominated: data.individuals <= DOMINATED_SHOWN,
    page: 0, sort: own[0],
    descending: true, frontOnly: false, generation: Math.max(0, ...generations())};

  const select = (id, value, onchange) => el("select", {id, onchange},
    names.map((n) => el("option", {value: n, ...(n === value ? {selected: ""} : {})}, n)));
  const slider = el("input", {type: "range", id: "generation", min: Math.min(...generations()) || 0,
    max: state.generation, step: 1, value: state.generation, oninput: (e) => {
      state.generation = Number(e.target.value); drawFront();
    }});
  const sliderLabel = el("span", {id: "generation-label"});
  const dominated = el("input", {type: "checkbox", id: "show-dominated",
    ...(state.dominated ? {checked: ""} : {}),
    onchange: (e) => { state.dominated = e.target.checked; drawFront(); }});
  const dominatedCount = el("span", {id: "dominated-count"});
  const header = el("section", {id: "summary"});
  const frontPlot = el("div", {id: "front-plot", class: "plot"});
  const hvPlot = el("div", {id: "hv-plot", class: "plot small"});
  const svtPlot = el("div", {id: "svt-plot", class: "plot small"});
  const opsPlot = el("div", {id: "ops-plot", class: "plot small"});
  const costPlot = el("div", {id: "cost-plot", class: "plot small"});
  const tableHolder = el("section", {id: "individuals"});

  main.replaceChildren(header,
    el("h2", {}, "Pareto front"),
    el("div", {class: "controls"},
      el("label", {}, "x ", select("x-objective", state.x, (e) => { state.x = e.target.value; drawFront(); })),
      el("label", {}, "y ", select("y-objective", state.y, (e) => { state.y = e.target.value; drawFront(); })),
      el("label", {}, "generation ", slider, " ", sliderLabel),
      el("label", {}, dominated, " dominated points ", dominatedCount)),
    frontPlot,
    el("div", {class: "grid"},
      el("figure", {}, el("figcaption", {}, "hypervolume per generation"), hvPlot),
      el("figure", {}, el("figcaption", {}, "search estimate vs held-out test (is the search " +
        "overfitting its items?)"), svtPlot),
      el("figure", {}, el("figcaption", {}, "operators that produced front members"), opsPlot),
      el("figure", {}, el("figcaption", {}, "fitness cost: items asked by stage"), costPlot)),
    el("h2", {}, "Individuals"), tableHolder);

  function drawSummary() {
    const done = data.generations.filter((g) => !g.final).length;
    header.replaceChildren(el("h1", {}, run),
      el("p", {}, el("span", {class: "state", id: "run-state"}, data.state), " · ",
        el("span", {id: "generations-done"}, `${done} / ${data.plan.planned}`), " generations · ",
        `${data.individuals.toLocaleString("en")} individuals · strategy ${data.plan.strategy}, `,
        `${data.plan.mode} · objectives `,
        Object.entries(data.plan.objectives).map(([n, d]) => `${n} (${d})`).join(", ")),
      el("p", {class: "muted"}, costLine(data.cost)));
  }

  async function drawFront() {
    await loading;
    const g = state.generation;
    const info = data.generations.find((x) => x.generation === g);
    sliderLabel.textContent = info ? `${g}${info.final ? " (final)" : ""}` : String(g);
    const points = await view.get(`/api/runs/${enc(run)}/points?generation=${g}&x=${enc(state.x)}` +
      `&y=${enc(state.y)}&dominated=${state.dominated ? 1 : 0}`);
    const hover = (cols) => cols.ids.map((id, i) => `${esc(id)} (${esc(cols.operator[i])})<br>` +
      `${esc(state.x)} ${esc(fmt(state.x, [cols.x[i], cols.x_err[i]]))}<br>` +
      `${esc(state.y)} ${esc(fmt(state.y, [cols.y[i], cols.y_err[i]]))}`);
    const trace = (cols, name, style) => Object.assign({
      type: cols.ids.length > 2000 ? "scattergl" : "scatter", name, x: cols.x, y: cols.y, customdata: cols.ids, text: hover(cols),
      hoverinfo: "text",
      error_x: {type: "data", array: cols.x_err, visible: true, thickness: 1},
      error_y: {type: "data", array: cols.y_err, visible: true, thickness: 1},
    }, style);
    const traces = [];
    if (points.dominated) {
      traces.push(trace(points.dominated, `dominated (${points.dominated.ids.length})`,
        {mode: "markers", marker: {color: "#c4c4c4", size: 6},
          error_x: {visible: false}, error_y: {visible: false}}));
    }
    traces.push(trace(points.front, `front (${points.front.ids.length})`,
      {mode: "lines+markers", line: {shape: "hv", color: "#1f6feb"},
        marker: {color: "#1f6feb", size: 9}}));
    const axis = (name, direction) => ({title: {text: `${name} (${direction})`},
      ...(isShare(name) ? {tickformat: ".0%"} : {})});
    await Plotly.react(frontPlot, traces, Object.assign({}, LAYOUT, {
      xaxis: axis(state.x, points.directions[0]), yaxis: axis(state.y, points.directions[1]),
      legend: {orientation: "h"}, uirevision: `${state.x}|${state.y}`}), PLOT_CONFIG);
    dominatedCount.textContent =
      `(${points.dominated_count.toLocaleString("en")})`;
    frontPlot.dataset.generation = String(g);
    frontPlot.dataset.front = String(points.front.ids.length);
  }

  function drawSide() {
    const gens = data.generations.filter((g) => !g.final);
    Plotly.react(hvPlot, [{type: "scatter", mode: "lines+markers", x: gens.map((g) => g.generation),
      y: gens.map((g) => g.hypervolume), hoverinfo: "x+y"}],
      Object.assign({}, LAYOUT, {xaxis: {title: {text: "generation"}, dtick: 1},
        yaxis: {title: {text: "hypervolume"}}}), PLOT_CONFIG);
    const svt = data.search_vs_test.filter((r) => r.search && r.test);
    const ends = svt.flatMap((r) => [r.search[0], r.test[0]]);
    const lo = Math.min(...ends, 1), hi = Math.max(...ends, 0);
    Plotly.react(svtPlot, [
      {type: "scatter", mode: "markers", x: svt.map((r) => r.search[0]), y: svt.map((r) => r.test[0]),
        customdata: svt.map((r) => r.id),
        text: svt.map((r) => `${esc(r.id)} (${esc(r.stage)})<br>search ${esc(fmt(data.metric, r.search))}` +
          `<br>test ${esc(fmt(data.metric, r.test))}`), hoverinfo: "text",
        error_x: {type: "data", array: svt.map((r) => r.search[1]), visible: true, thickness: 1},
        error_y: {type: "data", array: svt.map((r) => r.test[1]), visible: true, thickness: 1},
        marker: {size: 9, color: "#1f6feb"}, name: "reported"},
      {type: "scatter", mode: "lines", x: [lo, hi], y: [lo, hi], hoverinfo: "skip",
        line: {dash: "dot", color: "#888"}, name: "search = test"}],
      Object.assign({}, LAYOUT, {showlegend: false, xaxis: {title: {text: `search ${data.metric}`}},
        yaxis: {title: {text: `held-out ${data.metric}`}}}), PLOT_CONFIG);
    const ops = Object.entries(data.front_operators);
    Plotly.react(opsPlot, [{type: "bar", x: ops.map(([o]) => esc(o)), y: ops.map(([, n]) => n),
      hoverinfo: "x+y"}], Object.assign({}, LAYOUT, {yaxis: {title: {text: "front members"}}}),
      PLOT_CONFIG);
    const stages = Object.entries(data.cost.items_asked || {});
    Plotly.react(costPlot, [{type: "bar", x: stages.map(([s]) => esc(s)), y: stages.map(([, n]) => n),
      hoverinfo: "x+y"}], Object.assign({}, LAYOUT, {yaxis: {title: {text: "items asked"}}}),
      PLOT_CONFIG);
  }

  async function drawTable() {
    const page = await view.get(`/api/runs/${enc(run)}/table?page=${state.page}&sort=${enc(state.sort)}` +
      `&order=${state.descending ? "desc" : "asc"}&front=${state.frontOnly ? 1 : 0}`);
    const sortBy = (key) => () => {
      state.descending = state.sort === key ? !state.descending : true;
      state.sort = key; state.page = 0; drawTable();
    };
    const head = ["id", "generation", "operator", "stage"].map((k) => el("button",
      {class: "sort", onclick: sortBy(k)}, k))
      .concat(page.objectives.map((o) => el("button", {class: "sort", onclick: sortBy(o)}, o)))
      .concat([`held-out ${page.objectives[0]}`]);
    const rows = page.rows.map((r) => [
      el("a", {href: individualHref(run, r.id)}, r.id), r.generation, r.operator,
      r.error ? el("span", {class: "error"}, `failed: ${r.error}`) : (r.stage || "–"),
      ...page.objectives.map((o) => fmt(o, r.objectives[o])), fmt(page.objectives[0], r.test)]);
    const pager = el("div", {class: "pager"},
      el("button", {id: "prev-page", onclick: () => { state.page -= 1; drawTable(); },
        ...(page.page === 0 ? {disabled: ""} : {})}, "‹ previous"),
      el("span", {id: "page-label"}, ` page ${page.page + 1} of ${page.pages} ` +
        `(${page.total.toLocaleString("en")} individuals) `),
      el("button", {id: "next-page", onclick: () => { state.page += 1; drawTable(); },
        ...(page.page + 1 >= page.pages ? {disabled: ""} : {})}, "next ›"),
      el("label", {}, el("input", {type: "checkbox", id: "front-only",
        ...(state.frontOnly ? {checked: ""} : {}),
        onchange: (e) => { state.frontOnly = e.target.checked; state.page = 0; drawTable(); }}),
        " front only"));
    const headers = el("tr", {}, head.map((h) => el("th", {}, h)));
    tableHolder.replaceChildren(pager, el("table", {id: "individuals-table"}, el("thead", {}, headers),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))))); 
  }

  function openPoint(event) {
    const id = event.points && event.points[0] && event.points[0].customdata;
    if (id) navigate(individualHref(run, id));
  }

  drawSummary();
  const table = drawTable();  // text first: the table does not wait for plotly
  table.catch(() => {});  // (its error surfaces below, where it is awaited)
  await drawFront();
  frontPlot.on("plotly_click", openPoint);
  drawSide();
  svtPlot.on("plotly_click", openPoint);
  await table;

  let version = data.version;
  view.every(POLL_MS, async () => {
    try {
      const now = await view.get(`/api/runs/${enc(run)}/version`);
      if (now.version === version) return;
      version = now.version;
      const atLatest = state.generation === Math.max(0, ...generations());
      data = await view.get(`/api/runs/${enc(run)}`);
      const latest = Math.max(0, ...generations());
      slider.max = latest;
      if (atLatest) { state.generation = latest; slider.value = latest; }
      drawSummary(); drawSide(); await drawFront(); await drawTable();
    } catch (error) { if (!aborted(error)) console.error(error); }
  });
}

// -- an individual --------------------------------------------------------------------------

function recipeTree(node) {
  if (Array.isArray(node)) {
    if (node.every((v) => typeof v !== "object" || v === null)) return el("span", {class: "leaf"}, JSON.stringify(node));
    return el("ol", {start: 0}, node.map((v) => el("li", {}, recipeTree(v))));
  }
  if (node && typeof node === "object") {
    const label = node.op ? `${node.op}${node.method ? ` · ${node.method}` : ""}` : (node.model ? `model ${node.model}` : "");
    const entries = Object.entries(node).filter(([k]) => !(k === "op" || k === "method" || (k === "model" && !node.op)));
    return el("details", {open: ""}, el("summary", {}, label || "{…}"),
      el("ul", {}, entries.map(([k, v]) => el("li", {}, el("span", {class: "key"}, `${k}: `), recipeTree(v)))));
  }
  return el("span", {class: "leaf"}, JSON.stringify(node));
}

function codeRecipe(recipe) {
  // a code search's genome: the program, and what changed from its first parent
  return el("div", {id: "recipe"},
    recipe.change ? el("p", {id: "change"}, `changed: ${recipe.change}`) : "",
    el("pre", {id: "source", class: "source"}, recipe.source));
}

function ancestryTree(run, node) {
  const label = el("span", {}, el("a", {href: individualHref(run, node.id)}, node.id),
    node.operator ? ` · ${node.operator}, generation ${node.generation}` : " (not in this run)",
    node.more ? ` · ${node.more} more parent(s)` : "");
  if (!node.parents.length) return label;
  return el("details", {open: ""}, el("summary", {}, label),
    el("ul", {}, node.parents.map((p) => el("li", {}, ancestryTree(run, p)))));
}

async function individualPage(view) {
  const parts = location.pathname.split("/");
  const run = decodeURIComponent(parts[2]), id = decodeURIComponent(parts[4]);
  document.title = `${id} · ${run} · evoforge`;
  crumbs(el("a", {href: runHref(run)}, run), el("span", {}, id));
  const loading = plotly();
  const d = await view.get(`/api/runs/${enc(run)}/individuals/${enc(id)}`);
  const names = [...new Set([...Object.keys(d.objectives || {}), ...Object.keys(d.test || {})])];
  const copy = el("button", {id: "copy-export", onclick: () => navigator.clipboard.writeText(d.export)}, "copy");
  const taskPlot = el("div", {id: "task-plot", class: "plot small"});
  const parentRows = d.parents.map((p) => [
    p.known ? el("a", {href: individualHref(run, p.id)}, p.id) : `${p.id} (not in this run)`,
    p.operator || "–", fmt("accuracy", (p.objectives || {}).accuracy),
    p.agreement.items ? `${(100 * p.agreement.agree).toFixed(1)} % of ${p.agreement.items}` : "no common items",
    String(p.agreement.gained), String(p.agreement.lost)]);
  document.getElementById("main").replaceChildren(
    el("h1", {}, id),
    el("p", {}, `generation ${d.generation} · ${d.operator} · ${d.stage || "not scored"} · ` +
      `${d.items} items in its estimate · ${d.answered} items answered in the run`),
    d.error ? el("p", {class: "error"}, `failed: ${d.error}`) : "",
    el("h2", {}, "Export"), el("p", {}, el("code", {id: "export-command"}, d.export), " ", copy),
    el("h2", {}, "Scores"),
    table(["objective", "search estimate", "held-out test"],
      names.map((n) => [n, fmt(n, (d.objectives || {})[n]), fmt(n, (d.test || {})[n])]), {id: "scores"}),
    taskPlot,
    el("h2", {}, "Parents"),
    d.parents.length ? table(["parent", "operator", "search accuracy", "agreement on common items",
      "gained (child right, parent wrong)", "lost"], parentRows, {id: "parents"})
      : el("p", {class: "muted"}, "none: a seed or calibration recipe"),
    el("h2", {}, "Children"),
    d.children.length ? el("p", {id: "children"}, d.children.flatMap((c, i) =>
      [i ? ", " : "", el("a", {href: individualHref(run, c)}, c)])) : el("p", {class: "muted"}, "none"),
    el("h2", {}, "Lineage"), el("div", {id: "ancestry", class: "tree"}, ancestryTree(run, d.ancestry)),
    el("h2", {}, "Recipe"), d.recipe.op === "code" ? codeRecipe(d.recipe)
      : el("div", {id: "recipe", class: "tree"}, recipeTree(d.recipe)));
  const tasks = d.tasks;
  const bar = (key, name, color) => ({type: "bar", name, x: tasks.map((t) => esc(t.task)),
    y: tasks.map((t) => (t[key] ? t[key][0] : null)), marker: {color},
    error_y: {type: "data", array: tasks.map((t) => (t[key] ? t[key][1] : null)), visible: true}});
  if (tasks.length) {
    await loading;
    await Plotly.react(taskPlot, [bar("search", "search estimate", "#1f6feb"), bar("test", "held-out test", "#f0883e")],
      Object.assign({}, LAYOUT, {barmode: "group", yaxis: {title: {text: "accuracy"}, tickformat: ".0%"}}),
      PLOT_CONFIG);
  }
}

// -- compare --------------------------------------------------------------------------------

async function comparePage(view) {
  document.title = "compare runs · evoforge";
  crumbs("compare");
  const chosen = new URLSearchParams(location.search).getAll("run");
  const main = document.getElementById("main");
  if (!chosen.length) {
    main.replaceChildren(el("p", {}, "Pick runs to compare on the ", el("a", {href: "/"}, "runs page"), "."));
    return;
  }
  const loading = plotly();
  const {runs} = await view.get("/api/compare?" + chosen.map((r) => `run=${enc(r)}`).join("&"));
  const fronts = el("div", {id: "compare-fronts", class: "plot"});
  const curves = el("div", {id: "compare-hv", class: "plot small"});
  main.replaceChildren(el("h1", {}, `Compare ${runs.length} runs`),
    el("h2", {}, "Final fronts"), fronts, el("h2", {}, "Hypervolume per generation"), curves);
  await loading;
  await Plotly.react(fronts, runs.map((r) => ({type: "scatter", mode: "lines+markers", name: esc(r.run),
    x: r.front.x, y: r.front.y, customdata: r.front.ids, line: {shape: "hv"},
    text: r.front.ids.map((id) => `${esc(r.run)}: ${esc(id)}`), hoverinfo: "text+x+y",
    error_y: {type: "data", array: r.front.y_err, visible: true, thickness: 1}})),
  Object.assign({}, LAYOUT, {xaxis: {title: {text: runs[0] ? runs[0].x : ""}},
    yaxis: {title: {text: runs[0] ? runs[0].y : ""}}}), PLOT_CONFIG);
  fronts.on("plotly_click", (event) => {
    const point = event.points[0];
    navigate(individualHref(runs[point.curveNumber].run, point.customdata));
  });
  await Plotly.react(curves, runs.map((r) => ({type: "scatter", mode: "lines+markers", name: esc(r.run),
    x: r.hypervolume.map((g) => g.generation), y: r.hypervolume.map((g) => g.hypervolume)})),
  Object.assign({}, LAYOUT, {xaxis: {title: {text: "generation"}}, yaxis: {title: {text: "hypervolume"}}}),
  PLOT_CONFIG);
}

// -- routing ---------------------------------------------------------------------------------

const ROUTES = [[/^\/$/, runsPage], [/^\/runs\/[^/]+$/, runPage],
  [/^\/runs\/[^/]+\/individuals\/[^/]+$/, individualPage], [/^\/compare$/, comparePage]];

function pageFor(path) {
  const route = ROUTES.find(([pattern]) => pattern.test(path));
  return route ? route[1] : null;
}

function render() {
  // leave the old page: its requests aborted, its timers stopped, its plots freed
  if (current) {
    current.controller.abort();
    current.timers.forEach(clearInterval);
    if (window.Plotly) document.querySelectorAll(".js-plotly-plot").forEach((p) => Plotly.purge(p));
  }
  // a page's requests and timers are its own: once it is left, they stop and cannot draw
  const controller = new AbortController();
  const mine = {controller, timers: [], started: current ? performance.now() : 0,
    get: (url) => getJSON(url, controller.signal),
    every: (ms, task) => mine.timers.push(setInterval(task, ms))};
  current = mine;
  document.body.dataset.ready = "0";
  document.getElementById("main").replaceChildren(el("p", {class: "muted", id: "loading"}, "loading…"));
  const page = pageFor(location.pathname);
  if (!page) { fail(new Error(`no page at ${location.pathname}`)); return; }
  page(mine).then(() => {
    if (current !== mine) return;
    document.body.dataset.drawnMs = String(Math.round(performance.now() - mine.started));
    document.body.dataset.ready = "1";
  }).catch(fail);
}

function navigate(url) {
  document.body.dataset.ready = "0";
  history.pushState(null, "", url);
  window.scrollTo(0, 0);
  render();
}

document.addEventListener("click", (event) => {
  const link = event.target.closest && event.target.closest("a[href]");
  if (!link || event.defaultPrevented || event.button !== 0 || link.target ||
      event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || !pageFor(url.pathname)) return;
  event.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener("popstate", render);
document.addEventListener("DOMContentLoaded", render);
