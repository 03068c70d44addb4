// The mmrag playground: plain JavaScript over the /v1 API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("mmrag-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("mmrag-api-key", keyInput.value.trim());
  refreshDocuments();
  refreshEvals();
});

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = keyInput.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json() : await response.text();
  if (!response.ok) {
    const message = body && body.message ? body.code + ": " + body.message : response.status + " " + body;
    throw new Error(message);
  }
  return body;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function baseName(source) {
  return String(source || "").split(/[\\/]/).pop();
}

function scoreText(hit) {
  const parts = Object.entries(hit.scores || {}).map(([k, v]) => k + "=" + Number(v).toFixed(3));
  return "score " + Number(hit.score).toFixed(3) + " (" + parts.join(" ") + ")";
}

// Images need the API key, which an <img src> cannot send: fetch them and show object URLs.
async function authImage(url, alt) {
  const img = el("img", {alt: alt || "", "data-src": url});
  try {
    const response = await fetch(url, {headers: headers()});
    if (response.ok) img.src = URL.createObjectURL(await response.blob());
  } catch (err) {
    img.alt = "unavailable";
  }
  return img;
}

function showError(target, err) {
  target.replaceChildren(el("span", {class: "error"}, err.message || String(err)));
}

// -- readiness ------------------------------------------------------------------------------------------------
async function checkReady() {
  const badge = $("ready");
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    authRequired = body.auth !== false;
    badge.textContent = body.status + (authRequired ? "" : " (no auth)");
    badge.className = "badge " + (body.ready ? "ok" : body.status === "failed" ? "bad" : "");
    if (!body.ready && body.status !== "failed") setTimeout(checkReady, 2000);
    return body.ready;
  } catch (err) {
    badge.textContent = "unreachable";
    badge.className = "badge bad";
    return false;
  }
}

// -- documents ------------------------------------------------------------------------------------------------
async function refreshDocuments() {
  const body = $("documents").querySelector("tbody");
  try {
    const data = await api("/v1/documents");
    body.replaceChildren(...data.documents.map((d) => el("tr", {"data-doc": d.doc_id},
      el("td", {title: d.doc_id}, d.name), el("td", {}, d.mime), el("td", {}, d.chunks.text),
      el("td", {}, d.chunks.image),
      el("td", {}, el("button", {type: "button", onclick: () => deleteDocument(d.doc_id)}, "delete")))));
  } catch (err) {
    body.replaceChildren(el("tr", {}, el("td", {colspan: 5, class: "error"}, err.message)));
  }
}

async function deleteDocument(docId) {
  try {
    await api("/v1/documents/" + encodeURIComponent(docId), {method: "DELETE"});
  } catch (err) {
    showError($("upload-report"), err);
  }
  refreshDocuments();
}

$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = $("upload-files").files;
  const report = $("upload-report");
  if (!files.length) { report.textContent = "choose one or more files first"; return; }
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  report.textContent = "ingesting " + files.length + " file(s)…";
  try {
    const data = await api("/v1/documents", {method: "POST", body: form});
    const lines = ["added " + data.added + ", updated " + data.updated + ", unchanged " + data.unchanged +
                   "; chunks: " + data.chunks.text + " text, " + data.chunks.image + " image"];
    for (const f of data.failed) lines.push("failed " + f.source + ": " + f.reason);
    report.textContent = lines.join("\n");
  } catch (err) {
    showError(report, err);
  }
  refreshDocuments();
});
$("refresh-docs").addEventListener("click", refreshDocuments);

// -- search ---------------------------------------------------------------------------------------------------
function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("search-status");
  const k = Number($("search-k").value || 5);
  const request = {text: $("search-text").value || null, k_text: k, k_image: Math.min(k, 6)};
  const image = $("search-image").files[0];
  if (image) request.image = await readBase64(image);
  status.textContent = "searching…";
  try {
    const data = await api("/v1/search", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(request)});
    status.textContent = data.text.length + " passage(s), " + data.images.length + " image(s)" +
      (data.grounded ? "" : " — nothing passed the relevance threshold");
    $("search-passages").replaceChildren(...data.text.map((hit) => el("li", {},
      el("strong", {}, baseName(hit.source) + (hit.page != null ? " p." + hit.page : "")), " ",
      el("span", {class: "score"}, scoreText(hit)), el("div", {}, hit.text.slice(0, 400)))));
    const figures = await Promise.all(data.images.map(async (hit) => el("figure", {class: "hit-image"},
      await authImage(hit.blob, hit.context), el("figcaption", {}, hit.context.slice(0, 80), el("br"),
      el("span", {class: "score"}, "score " + Number(hit.score).toFixed(3))))));
    $("search-images").replaceChildren(...figures);
  } catch (err) {
    showError(status, err);
  }
});

// -- generate -------------------------------------------------------------------------------------------------
function renderAnswer(answer) {
  // Citation markers [n] link to their source below.
  const box = $("answer");
  const parts = answer.text.split(/(\[\d+(?:\s*[,-]\s*\d+)*\])/g);
  box.replaceChildren(...parts.map((part) => {
    const match = part.match(/^\[(\d+)/);
    return match ? el("a", {class: "cite", href: "#src-" + match[1]}, part) : document.createTextNode(part);
  }));
}

async function renderResult(answer) {
  renderAnswer(answer);
  const cited = new Set(answer.citations.map((c) => c.marker));
  $("answer-sources").replaceChildren(...answer.sources.map((s) => el("li", {id: "src-" + s.marker, value: s.marker},
    el("strong", {}, "[" + s.marker + "] " + baseName(s.source) + (s.page != null ? " p." + s.page : "")),
    " ", el("span", {class: "score"}, s.modality + ", score " + Number(s.score).toFixed(3) +
                                      (cited.has(s.marker) ? ", cited" : "")),
    el("div", {}, (answer.citations.find((c) => c.marker === s.marker) || {}).snippet || ""))));
  // Generated images beside the reference images that guided them.
  const figures = [];
  for (const s of answer.sources.filter((s) => s.modality === "image")) {
    figures.push(el("figure", {class: "reference"}, await authImage("/v1/images/" + s.chunk_id, "reference"),
                    el("figcaption", {}, "reference [" + s.marker + "]")));
  }
  for (const image of answer.images || []) {
    if (!image.url) continue;
    figures.push(el("figure", {class: "generated"}, await authImage(image.url, "generated"),
                    el("figcaption", {}, "generated" + (image.mode ? " (" + image.mode + ")" : ""))));
  }
  $("answer-images").replaceChildren(...figures);
  const notes = [];
  if (answer.abstained) notes.push("abstained: " + answer.abstain_reason);
  if (answer.unsupported.length) notes.push("unsupported: " + answer.unsupported.join(" | "));
  if (answer.image_error) notes.push("no image: " + answer.image_error);
  if (answer.usage && answer.usage.completion_tokens != null) notes.push(answer.usage.completion_tokens + " tokens");
  $("answer-notes").textContent = notes.join(" · ");
}

async function streamAnswer(request) {
  const response = await fetch("/v1/generate", {method: "POST", headers: headers({"Content-Type": "application/json"}),
                                                body: JSON.stringify(request)});
  if (!response.ok) {
    const body = await response.json();
    throw new Error(body.code + ": " + body.message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const event = (block.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "null");
      if (event === "token") { text += data.text; $("answer").textContent = text; }
      else if (event === "done") await renderResult(data);
      else if (event === "error") throw new Error(data.code + ": " + data.message);
    }
  }
}

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const request = {prompt: $("generate-prompt").value, stream: $("generate-stream").checked,
                   images: $("generate-images").checked, max_new_tokens: Number($("generate-max").value || 96)};
  $("answer").textContent = "…";
  $("answer-sources").replaceChildren();
  $("answer-images").replaceChildren();
  $("answer-notes").textContent = "";
  try {
    if (request.stream) await streamAnswer(request);
    else await renderResult(await api("/v1/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                                       body: JSON.stringify(request)}));
  } catch (err) {
    showError($("answer"), err);
  }
});

// -- evals ----------------------------------------------------------------------------------------------------
async function refreshEvals() {
  const body = $("evals").querySelector("tbody");
  try {
    const data = await api("/v1/evals");
    body.replaceChildren(...data.jobs.map((job) => el("tr", {"data-job": job.id},
      el("td", {}, job.id.slice(0, 8)), el("td", {}, job.dataset), el("td", {class: "job-status"}, job.status),
      el("td", {}, el("button", {type: "button", onclick: () => openReport(job.id)}, "open report")))));
    if (data.jobs.some((job) => job.status === "queued" || job.status === "running")) setTimeout(refreshEvals, 2000);
  } catch (err) {
    body.replaceChildren(el("tr", {}, el("td", {colspan: 4, class: "error"}, err.message)));
  }
}

async function openFile(jobId, name) {
  const response = await fetch("/v1/evals/" + jobId + "/files/" + encodeURIComponent(name), {headers: headers()});
  if (response.ok) window.open(URL.createObjectURL(await response.blob()), "_blank");
}

async function openReport(jobId) {
  const box = $("eval-report");
  try {
    const job = await api("/v1/evals/" + jobId);
    const lines = ["job " + job.id + ": " + job.status];
    if (job.error) lines.push(job.error.code + ": " + job.error.message);
    if (job.summary && job.summary.modes) {
      for (const [mode, m] of Object.entries(job.summary.modes)) {
        lines.push(mode + ": " + Object.entries(m).filter(([, v]) => typeof v === "number")
          .map(([k, v]) => k + "=" + (Number.isInteger(v) ? v : v.toFixed(3))).join(" "));
      }
    } else if (job.summary) {
      lines.push(JSON.stringify(job.summary, null, 2));
    }
    box.replaceChildren(document.createTextNode(lines.join("\n") + "\n"),
      ...job.files.map((name) => el("button", {type: "button", class: "eval-file", onclick: () => openFile(job.id, name)},
                                    name)));
  } catch (err) {
    showError(box, err);
  }
}

$("eval-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const request = {dataset: $("eval-dataset").value, corpus: $("eval-corpus").value || null,
                   limit: Number($("eval-limit").value || 20), retrieval_only: true};
  try {
    await api("/v1/evals", {method: "POST", headers: {"Content-Type": "application/json"},
                            body: JSON.stringify(request)});
  } catch (err) {
    showError($("eval-report"), err);
  }
  refreshEvals();
});
$("refresh-evals").addEventListener("click", refreshEvals);

let authRequired = true;
checkReady().then((ready) => {
  if (ready && (!authRequired || keyInput.value.trim())) { refreshDocuments(); refreshEvals(); }
});
