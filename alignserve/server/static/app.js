// alignserve playground: plain JS over the public API only (GET /v1/models, GET /v1/heads,
// POST /v1/chat/completions and /v1/completions with SSE). No build step, no dependencies.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const k of kids) e.append(k);
  return e;
};

// Which loaded objectives steer which strategies: value heads drive VAS / controlled decoding,
// ARM heads drive GenARM, and sequence rewards drive every other strategy.
const HEAD_KIND = { vas: "value_head", cd: "value_head", genarm: "arm" };
// Parameters drawn as sliders (weights) or not at all (per-reward option objects).
const SKIP_PARAMS = new Set(["weights", "reward_options"]);

const state = { model: null, heads: [], strategies: {}, rewardRange: {}, aborts: [] };

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("#apikey").value.trim();
  if (key) h.authorization = "Bearer " + key;
  return h;
}

function setStatus(msg) { $("#status").textContent = msg; }

async function getJSON(path) {
  const r = await fetch(path, { headers: headers() });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

// ---- set-up from the server's own description ------------------------------------------------
async function load() {
  try {
    const models = await getJSON("/v1/models");
    state.model = models.data[0].id;
    $("#model").textContent = state.model;
    const heads = await getJSON("/v1/heads");
    state.heads = heads.data;
    for (const row of heads.data) if (row.range) state.rewardRange[row.name] = row.range;
    const sel = $("#strategy");
    sel.innerHTML = "";
    for (const s of heads.strategies) {
      state.strategies[s.name] = s;
      sel.append(el("option", { value: s.name, text: s.name }));
    }
    sel.value = state.strategies.best_of_n ? "best_of_n" : heads.strategies[0].name;
    renderStrategy();
    setStatus("ready");
    document.body.dataset.ready = "1";
  } catch (err) {
    setStatus("could not load the server's description: " + err.message +
              " (an API key may be needed)");
  }
}

// Objectives a strategy can be steered by, each with its weight range.
function objectivesFor(strategy) {
  if (strategy === "sample") return [];
  const kind = HEAD_KIND[strategy] || "reward";
  // rewards that need options with no default (keywords, regex) are API-only here
  return state.heads.filter(h => h.kind === kind &&
    !Object.values(h.options || {}).some(d => String(d).startsWith("required")));
}

function renderStrategy() {
  const name = $("#strategy").value;
  const s = state.strategies[name];
  $("#strategy-desc").textContent = s ? s.description : "";
  $("#out-aligned .strategy-name").textContent = "(" + name + ")";
  const params = $("#params");
  params.innerHTML = "";
  for (const [key, sch] of Object.entries((s && s.parameters) || {})) {
    if (SKIP_PARAMS.has(key)) continue;
    let input;
    if (sch.type === "boolean") {
      input = el("input", { type: "checkbox", checked: !!sch.default });
    } else if (sch.type === "integer" || sch.type === "number") {
      input = el("input", { type: "number", value: sch.default ?? "" });
      if (sch.minimum !== undefined) input.min = sch.minimum;
      if (sch.maximum !== undefined) input.max = sch.maximum;
      input.step = sch.type === "integer" ? "1" : "any";
    } else if (sch.type === "string" && /^\^\(([\w|]+)\)\$$/.test(sch.pattern || "")) {
      input = el("select");
      for (const opt of sch.pattern.slice(2, -2).split("|")) {
        input.append(el("option", { value: opt, text: opt }));
      }
      input.value = sch.default;
    } else {
      input = el("input", { type: "text", value: sch.default ?? "" });
    }
    input.dataset.param = key;
    input.dataset.kind = sch.type;
    input.title = sch.description || "";
    params.append(el("label", { title: sch.description || "" }, key, input));
  }
  const sliders = $("#sliders");
  sliders.innerHTML = "";
  const objs = objectivesFor(name);
  for (const h of objs) {
    const [lo, hi] = h.weight_range;
    const input = el("input", { type: "range", min: lo, max: hi, step: (hi - lo) / 100,
                                value: 0, "data-name": h.name });
    input.setAttribute("aria-label", "weight of " + h.name);
    const out = el("output", { text: "0" });
    const digits = hi - lo <= 1 ? 2 : 1;  // e.g. a per-token lexical ARM's 0-0.5
    input.addEventListener("input", () => { out.textContent = (+input.value).toFixed(digits); });
    sliders.append(el("div", { className: "slider", title: h.description },
                      el("span", { text: h.name }), input, out));
  }
  const kind = HEAD_KIND[name] || "reward";
  $("#sliders-note").textContent = name === "sample" ? "plain sampling: no weights" :
    objs.length ? `${kind === "reward" ? "rewards" : kind + "s"} steer ${name}; 0 = off` :
    `no ${kind} loaded on this server (train one with 'alignserve train')`;
}

// ---- the request --------------------------------------------------------------------------
function strategyOptions(name, zeroWeights) {
  const opts = { strategy: name };
  for (const input of $("#params").querySelectorAll("[data-param]")) {
    const k = input.dataset.param;
    if (input.dataset.kind === "boolean") opts[k] = input.checked;
    else if (input.dataset.kind === "integer") opts[k] = parseInt(input.value, 10);
    else if (input.dataset.kind === "number") opts[k] = parseFloat(input.value);
    else opts[k] = input.value;
  }
  // every objective is sent, zeros included, so the response reports each one's reward;
  // with every weight 0 an aligned strategy runs plain base sampling (= strategy "sample")
  const weights = {};
  for (const r of $("#sliders").querySelectorAll("input[type=range]")) {
    weights[r.dataset.name] = zeroWeights ? 0 : parseFloat(r.value);
  }
  if (Object.keys(weights).length) opts.weights = weights;
  return opts;
}

function requestBody(alignment) {
  const chat = $("input[name=mode]:checked").value === "chat";
  const text = $("#prompt").value;
  const body = {
    model: state.model, stream: true, stream_options: { include_usage: true },
    max_tokens: parseInt($("#max_tokens").value, 10) || 48,
    temperature: parseFloat($("#temperature").value),
    seed: parseInt($("#seed").value, 10),
  };
  if (chat) body.messages = [{ role: "user", content: text }];
  else body.prompt = text;
  if (alignment) body.alignment = alignment;
  return [chat ? "/v1/chat/completions" : "/v1/completions", body];
}

// Stream one request into a pane: text as it arrives, then the final chunk's rewards as bars.
async function streamInto(pane, path, body, abort) {
  const textBox = $(".text", pane);
  textBox.textContent = "";
  textBox.classList.remove("error");
  $(".bars", pane).innerHTML = "";
  $(".stats", pane).textContent = "";
  pane.dataset.done = "";
  const fail = msg => {
    textBox.textContent = msg;
    textBox.classList.add("error");
  };
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                signal: abort.signal });
  if (!r.ok) {
    const err = await r.json().catch(() => ({}));
    fail(`${r.status}: ${(err.error && err.error.message) || r.statusText}`);
    pane.dataset.done = "error";
    return;
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { fail(chunk.error.message); continue; }
        for (const ch of chunk.choices || []) {
          if (ch.index !== 0) continue;
          textBox.textContent += (ch.delta ? ch.delta.content : ch.text) || "";
        }
        if (chunk.usage) showStats(pane, chunk.usage, chunk.alignment);
        if (chunk.alignment && chunk.alignment.rewards) showBars(pane, chunk.alignment.rewards);
      }
    }
  }
  pane.dataset.done = textBox.classList.contains("error") ? "error" : "ok";
}

function rangeOf(name) {
  if (state.rewardRange[name]) return state.rewardRange[name];
  const head = state.heads.find(h => h.name === name);  // a head reports its reward's value
  return (head && state.rewardRange[head.reward]) || [-1, 1];
}

function showBars(pane, rewards) {
  const bars = $(".bars", pane);
  bars.innerHTML = "";
  for (const [name, values] of Object.entries(rewards)) {
    const v = values[0];
    const [lo, hi] = rangeOf(name);
    const frac = Math.max(0, Math.min(1, (v - lo) / (hi - lo || 1)));
    const fill = el("div", { className: "fill" });
    fill.style.width = (100 * frac).toFixed(1) + "%";
    bars.append(el("div", { className: "bar" + (frac < 0.5 ? " neg" : ""), "data-name": name,
                            "data-value": String(v), title: `range [${lo}, ${hi}]` },
                   el("span", { text: name }), el("div", { className: "track" }, fill),
                   el("span", { className: "val", text: v.toFixed(3) })));
  }
}

function showStats(pane, usage, alignment) {
  const parts = [`${usage.completion_tokens} tokens`];
  if (alignment) {
    if (alignment.tokens_generated !== undefined) {
      parts.push(`${alignment.tokens_generated} generated`);
    }
    if (alignment.time_s !== undefined) parts.push(`${alignment.time_s.toFixed(2)} s`);
  }
  $(".stats", pane).textContent = parts.join(" · ");
}

async function generate() {
  const name = $("#strategy").value;
  const compare = $("#compare").checked;
  const plainPane = $("#out-plain");
  plainPane.hidden = !compare;
  $("#generate").disabled = true;
  $("#stop").disabled = false;
  setStatus("generating…");
  document.body.dataset.busy = "1";
  state.aborts = [];
  const jobs = [];
  const run = (pane, alignment) => {
    const abort = new AbortController();
    state.aborts.push(abort);
    const [path, body] = requestBody(alignment);
    jobs.push(streamInto(pane, path, body, abort).catch(err => {
      $(".text", pane).textContent += `\n[${err.name === "AbortError" ? "stopped" : err.message}]`;
      pane.dataset.done = "error";
    }));
  };
  // "sample" has no weights to report rewards for; an aligned strategy with every weight 0
  // samples exactly as "sample" does (same seed, same tokens) and still scores its text
  const aligned = name === "sample" ? null : strategyOptions(name, false);
  run($("#out-aligned"), aligned);
  if (compare) run(plainPane, name === "sample" ? null : strategyOptions(name, true));
  await Promise.all(jobs);
  $("#generate").disabled = false;
  $("#stop").disabled = true;
  document.body.dataset.busy = "";
  setStatus("done");
}

$("#strategy").addEventListener("change", renderStrategy);
$("#generate").addEventListener("click", generate);
$("#stop").addEventListener("click", () => state.aborts.forEach(a => a.abort()));
$("#apikey").value = localStorage.getItem("alignserve-key") || "";
$("#apikey").addEventListener("change", () => {
  localStorage.setItem("alignserve-key", $("#apikey").value.trim());
  load();
});
load();
