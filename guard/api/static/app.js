// Hallucination guard playground: streams /v1/chat/completions and shades each token by
// the risk in the chunk's `guard` object. Plain browser JavaScript, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  controller: null,   // AbortController of the running request
  content: "",        // answer text from choices[0].delta.content
  tokens: [],         // scored tokens [{text, risk}] from guard.tokens
  riskiest: null,     // guard.riskiest_span of the last chunk: the riskiest final sentence
  thresholds: null,
  finished: 0,        // questions answered or failed so far
};

// Risk 0 -> green, 0.5 -> amber, 1 -> red (one direction everywhere: higher = riskier).
function riskColor(risk) {
  const r = Math.min(1, Math.max(0, Number(risk) || 0));
  return `hsl(${Math.round(120 * (1 - r))}, 80%, ${Math.round(88 - 18 * r)}%)`;
}

// Three decimals: calibrated risks of a weak model crowd near 1, and so do its thresholds.
function fmt(x) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(3) : "–";
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
    return JSON.stringify(body);
  } catch (_) {
    return response.statusText || `HTTP ${response.status}`;
  }
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      setStatus(`Could not list models: ${await errorMessage(response)}`, response.status !== 401);
      if (response.status === 401) setStatus("This server needs an API key: enter it, then ask.");
      return;
    }
    const body = await response.json();
    select.replaceChildren();
    for (const model of body.data || []) {
      const option = document.createElement("option");
      option.value = option.textContent = model.id;
      select.append(option);
    }
  } catch (err) {
    setStatus(`Could not list models: ${err.message}`, true);
  }
}

// Scored tokens are shaded; text streamed but not scored yet is shown plain after them.
function renderAnswer() {
  const answer = $("answer");
  const parts = [];
  let scored = "";
  state.tokens.forEach((token, i) => {
    const span = document.createElement("span");
    const scoredToken = typeof token.risk === "number";
    span.className = scoredToken ? "tok" : "tok unscored";  // unguarded servers send no risk
    span.textContent = token.text;
    if (scoredToken) span.style.backgroundColor = riskColor(token.risk);
    span.title = scoredToken ? `token ${i + 1}: risk ${fmt(token.risk)}` : `token ${i + 1}`;
    span.dataset.risk = scoredToken ? String(token.risk) : "";
    parts.push(span);
    scored += token.text;
  });
  if (state.content.startsWith(scored) && state.content.length > scored.length) {
    const pending = document.createElement("span");
    pending.className = "pending";
    pending.textContent = state.content.slice(scored.length);
    parts.push(pending);
  }
  answer.replaceChildren(...parts);
  answer.dataset.state = parts.length ? "streaming" : "empty";
  if (state.riskiest) outline(state.riskiest);
}

function renderRisk(risk) {
  $("risk").textContent = fmt(risk);
  const bar = $("risk-bar");
  bar.style.width = `${Math.round(100 * Math.min(1, Math.max(0, risk || 0)))}%`;
  bar.style.backgroundColor = riskColor(risk);
}

function renderThresholds(thresholds) {
  if (!thresholds) return;
  state.thresholds = thresholds;
  const parts = [];
  if (typeof thresholds.flag === "number") {
    parts.push(`flag ≥ ${fmt(thresholds.flag)}`);
    $("flag-mark").style.left = `${100 * thresholds.flag}%`;
  }
  if (typeof thresholds.abstain === "number") {
    parts.push(`abstain ≥ ${fmt(thresholds.abstain)}`);
    $("abstain-mark").style.left = `${100 * thresholds.abstain}%`;
  }
  $("thresholds").textContent = parts.join(", ") || "–";
}

// The scope gate: only factual questions are judged; elsewhere the risk is shown
// but does not count (the answer passes). `null`: the probe has no gate, all is judged.
function judged(scope) {
  return !scope || scope.in_scope !== false;
}

function renderScope(scope) {
  const cell = $("scope");
  cell.dataset.judged = String(judged(scope));
  $("verdict").dataset.judged = String(judged(scope));
  if (!scope) {
    cell.textContent = "judged (this probe has no scope gate)";
  } else if (scope.in_scope) {
    cell.textContent = `judged: a factual question (p = ${fmt(scope.score)})`;
  } else {
    cell.textContent = `not judged (p = ${fmt(scope.score)} of a factual question): ` +
      "the probe was trained on those only, so this risk does not count";
  }
}

// The knowledge gate: does the model know what the prompt asks about? `null`: no gate.
function renderPromptRisk(promptRisk, thresholds) {
  const cell = $("prompt-risk");
  if (typeof promptRisk !== "number") {
    cell.textContent = "– (this probe has no knowledge gate)";
    return;
  }
  const t = thresholds || {};
  let verdict = "the model seems to know what this asks about";
  if (typeof t.prompt_abstain === "number" && promptRisk >= t.prompt_abstain) {
    verdict = "the model does not know what this asks about: not answered";
  } else if (typeof t.prompt_flag === "number" && promptRisk >= t.prompt_flag) {
    verdict = "the model may not know what this asks about: flagged";
  }
  cell.textContent = `${fmt(promptRisk)}: ${verdict}`;
}

function renderLayers(layers) {
  const box = $("layers");
  const entries = Object.entries(layers || {})
    .map(([layer, share]) => [Number(layer), Number(share)])
    .filter(([layer, share]) => isFinite(layer) && isFinite(share))
    .sort((a, b) => a[0] - b[0]);
  const biggest = Math.max(1e-9, ...entries.map(([, share]) => Math.abs(share)));
  const bars = entries.map(([layer, share]) => {
    const column = document.createElement("div");
    column.className = "bar";
    column.title = `layer ${layer}: ${(100 * share).toFixed(1)}% of the answer logit`;
    column.dataset.layer = String(layer);
    const fill = document.createElement("span");
    fill.className = share >= 0 ? "fill up" : "fill down";
    fill.style.height = `${Math.max(2, Math.round(100 * Math.abs(share) / biggest))}%`;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = String(layer);
    column.append(fill, label);
    return column;
  });
  box.replaceChildren(...bars);
  box.classList.toggle("empty", !bars.length);
  if (!bars.length) box.textContent = "no layer shares in this response";
}

// Outline the tokens of one sentence (offsets into the answer, in code points as the
// server counts them: [...text], not UTF-16 units).
function outline(span) {
  let offset = 0;
  const elements = $("answer").querySelectorAll(".tok");
  state.tokens.forEach((token, i) => {
    const start = offset;
    offset += [...token.text].length;
    if (elements[i] && start < span.end && offset > span.start) {
      elements[i].classList.add("riskiest");
      elements[i].title += " · in the riskiest sentence";
    }
  });
}

// The riskiest sentence of the answer (guard.riskiest_span, one of guard.spans): outlined,
// and the note names its risk. Returns that span, or null (one sentence: the answer itself).
function markRiskiest(guard) {
  const riskiest = guard.riskiest_span;
  if (!riskiest || (guard.spans || []).length < 2) return null;
  outline(riskiest);
  return riskiest;
}

function renderVerdict(guard, finishReason) {
  const verdict = $("verdict");
  const decision = guard.decision || "none";
  verdict.dataset.decision = decision;
  verdict.dataset.guarded = String(guard.guarded !== false);
  $("decision").textContent = guard.guarded === false ? "unguarded"
    : guard.aborted ? `${decision} (stopped mid-answer)` : decision;
  renderRisk(guard.risk);
  if (guard.guarded === false) $("scope").textContent = "nothing is judged (unguarded)";
  else renderScope(guard.scope);
  if (guard.guarded !== false) renderPromptRisk(guard.prompt_risk, guard.thresholds);
  renderThresholds(guard.thresholds);
  if (guard.probe) $("probe").textContent = `${guard.probe.name} · ${String(guard.probe.sha256 || "").slice(0, 12)}`;
  renderLayers(guard.layers);
  const answer = $("answer");
  answer.dataset.state = "done";
  let note = "";
  if (guard.guarded === false) note = "The server runs unguarded: no risk was computed.";
  else if (!judged(guard.scope)) {
    note = "Not judged: the question is outside the probe's scope, so the answer passes " +
      "whatever its risk.";
  } else if (decision === "abstain" && guard.risk === null && typeof guard.prompt_risk === "number") {
    note = "Not answered: the model does not know what the prompt asks about (prompt risk " +
      `${fmt(guard.prompt_risk)} at or above ${fmt((guard.thresholds || {}).prompt_abstain)}).`;
  } else if (decision === "abstain" && guard.aborted) {
    const abort = (guard.thresholds || {}).abort;
    const sentence = guard.riskiest_span && guard.riskiest_span.risk >= abort && guard.risk < abort;
    const what = sentence ? "a finished sentence's risk" : "the running risk";
    note = `Generation was stopped: ${what} crossed the abort threshold (finish_reason ${finishReason || "content_filter"}).`;
  } else if (decision === "abstain") {
    note = "The final risk crossed the abstain threshold: a client must withdraw this answer.";
    answer.classList.add("withdrawn");
  } else if (decision === "flag") note = "Answer returned, flagged as risky.";
  else if (decision === "pass") note = "Answer passed the guard.";
  const riskiest = guard.guarded === false ? null : markRiskiest(guard);
  if (riskiest) note += ` Riskiest sentence (outlined): risk ${fmt(riskiest.risk)}.`;
  $("note").textContent = note;
}

function handleChunk(chunk) {
  if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
  const choice = (chunk.choices || [])[0] || {};
  const delta = choice.delta || {};
  if (typeof delta.content === "string") state.content += delta.content;
  const guard = chunk.guard;
  if (guard) {
    for (const token of guard.tokens || []) state.tokens.push(token);
    if (typeof guard.risk === "number") renderRisk(guard.risk);
    if ("scope" in guard && guard.guarded !== false) renderScope(guard.scope);
    if (guard.thresholds) renderThresholds(guard.thresholds);
    // outlined while streaming; the verdict outlines its own (markRiskiest)
    state.riskiest = guard.decision ? null : guard.riskiest_span || null;
  }
  renderAnswer();
  if (guard && guard.decision) renderVerdict(guard, choice.finish_reason);
}

// Server-sent events: blocks separated by a blank line, payload in `data:` lines.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onData(JSON.parse(data));
    }
  }
}

function reset() {
  state.content = "";
  state.tokens = [];
  state.riskiest = null;
  $("answer").classList.remove("withdrawn");
  $("answer").replaceChildren();
  $("answer").dataset.state = "empty";
  $("note").textContent = "";
  $("verdict").dataset.decision = "none";
  $("verdict").dataset.guarded = "true";
  $("verdict").dataset.judged = "true";
  $("scope").textContent = "–";
  $("scope").dataset.judged = "";
  $("decision").textContent = "answering…";
  $("layers").replaceChildren();
  renderRisk(0);
  $("risk").textContent = "–";
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  if (!$("model").value) await loadModels();
  reset();
  setStatus("Streaming…");
  $("send").disabled = true;
  $("stop").disabled = false;
  state.controller = new AbortController();
  const body = {
    model: $("model").value || undefined,
    messages: [{ role: "user", content: question }],
    max_tokens: Number($("max-tokens").value) || undefined,
    // 0 = greedy, the decoding the probes are trained on
    temperature: Number($("temperature").value) || 0,
    stream: true,
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, handleChunk);
    setStatus($("verdict").dataset.decision === "none" ? "Stream ended without a verdict." : "Done.");
  } catch (err) {
    if (err.name === "AbortError") setStatus("Stopped.");
    else setStatus(`Error: ${err.message}`, true);
    if ($("verdict").dataset.decision === "none") $("decision").textContent = "no verdict";
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
    state.finished += 1;
    document.body.dataset.finished = String(state.finished);  // for automated checks
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit();
  });
  const saved = sessionStorage.getItem("hguard-api-key");
  if (saved) $("api-key").value = saved;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("hguard-api-key", $("api-key").value.trim());
    loadModels();
  });
  loadModels();
});
