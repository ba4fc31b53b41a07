// The web page: collections, uploads with job progress, documents with
// fields, search, answers.
// Plain ES module, no build step. Every piece of data goes into the page
// through textContent (never innerHTML), so documents cannot inject markup.
// vendor/eventsource-parser: the npm package eventsource-parser 4.1.3 (MIT), its
// dist files copied unchanged; a spec-complete SSE parser for fetch streams.
import { EventSourceParserStream } from "./vendor/eventsource-parser/stream.js";

const KEY_STORAGE = "colbert-server.api-key";
const COLLECTION_STORAGE = "colbert-server.collection";
const JOB_POLL_MS = 500;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- API calls

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders(extra) {
  const headers = new Headers(extra);
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

// The API's error shape is {"error": {"code", "message"}}; anything else
// (a proxy's HTML page, say) still becomes a readable message.
async function errorFrom(response) {
  let code = `http_${response.status}`;
  let message = `HTTP ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}

async function send(method, path, { json, form, accept } = {}) {
  const init = { method, headers: authHeaders(accept ? { Accept: accept } : undefined) };
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network_error", `cannot reach the server (${err.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

async function api(method, path, options) {
  const response = await send(method, path, options);
  return response.status === 204 ? null : response.json();
}

// Paths relative to the page, so it also works under a proxy's path prefix.
const collectionPath = (name) => `v1/collections/${encodeURIComponent(name)}`;
const documentPath = (collection, id) => `${collectionPath(collection)}/documents/${encodeURIComponent(id)}`;

// ---------------------------------------------------------------- helpers

// h("li", {className: "x"}, "text", child): an element whose strings become text nodes.
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function showError(target, err) {
  const text = err instanceof ApiError ? `${err.message} (${err.code})` : `${err.message || err}`;
  target.textContent = text;
  target.hidden = false;
}

function clearError(target) {
  target.textContent = "";
  target.hidden = true;
}

// Runs a form's action with its submit button disabled and its errors shown.
function onSubmit(form, errorBox, action) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit], button:not([type])");
    clearError(errorBox);
    if (button) button.disabled = true;
    try {
      await action();
    } catch (err) {
      showError(errorBox, err);
    } finally {
      if (button) button.disabled = false;
    }
  });
}

const formatScore = (score) => (typeof score === "number" ? score.toFixed(3) : "–");

function currentCollection() {
  const name = $("collection").value;
  if (!name) throw new Error("pick or create a collection first");
  return name;
}

// ---------------------------------------------------------------- API key

function setupKey() {
  const input = $("api-key");
  input.value = localStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    $("key-status").textContent = key ? "saved in this browser" : "no key";
    loadCollections();
  });
}

// ---------------------------------------------------------------- collections

let collections = [];

function describeCollection() {
  const info = $("collection-info");
  const c = collections.find((item) => item.name === $("collection").value);
  if (!c) {
    info.textContent = "";
    return;
  }
  let text = `${c.documents} documents, ${c.chunks} chunks` + (c.pending_documents ? `, ${c.pending_documents} pending` : "");
  if (c.checkpoint) text += `; checkpoint ${c.checkpoint}`;
  if (c.reindex && c.reindex.state === "running") {
    text += `; re-indexing with ${c.reindex.checkpoint || "the configured checkpoint"}: ${Math.round(100 * c.reindex.progress)}%`;
  } else if (c.reindex && c.reindex.state === "failed") {
    text += `; the last re-index failed: ${c.reindex.error}`;
  }
  info.textContent = text;
}

async function loadCollections(select) {
  const errorBox = $("collections-error");
  const picker = $("collection");
  try {
    collections = (await api("GET", "v1/collections")).collections;
    clearError(errorBox);
  } catch (err) {
    showError(errorBox, err);
    return;
  }
  const wanted = select || picker.value || localStorage.getItem(COLLECTION_STORAGE);
  picker.replaceChildren(
    ...collections.map((c) => h("option", { value: c.name }, c.name)),
  );
  if (!collections.length) picker.append(h("option", { value: "", disabled: true }, "none yet: create one"));
  if (collections.some((c) => c.name === wanted)) picker.value = wanted;
  if (picker.value) localStorage.setItem(COLLECTION_STORAGE, picker.value);
  describeCollection();
}

function setupCollections() {
  $("collection").addEventListener("change", () => {
    localStorage.setItem(COLLECTION_STORAGE, $("collection").value);
    describeCollection();
  });
  $("refresh-collections").addEventListener("click", () => loadCollections());
  onSubmit($("create-form"), $("collections-error"), async () => {
    const input = $("new-collection");
    const created = await api("POST", "v1/collections", { json: { name: input.value.trim() } });
    input.value = "";
    await loadCollections(created.name);
  });
}

// ---------------------------------------------------------------- uploads and jobs

let activeJob = null; // the job being polled; a new upload replaces it

function renderJob(job) {
  $("job").hidden = false;
  $("job").dataset.state = job.state;
  $("job-id").textContent = job.id;
  $("job-state").textContent = job.state;
  $("job-files").textContent = `${job.files_done}/${job.files_total}`;
  $("job-chunks").textContent = `${job.chunks_done}/${job.chunks_total}`;
  const progress = $("job-progress");
  progress.max = Math.max(job.files_total, 1);
  progress.value = job.files_done;
  $("job-table").tBodies[0].replaceChildren(
    ...job.files.map((f) =>
      h(
        "tr",
        { className: f.state === "failed" ? "failed" : "" },
        h("td", {}, f.filename),
        h("td", {}, f.document_id),
        h("td", {}, f.state),
        h("td", {}, f.chunks),
        h("td", { className: "error-text" }, f.error || ""),
      ),
    ),
  );
}

async function pollJob(jobId) {
  const errorBox = $("upload-error");
  while (activeJob === jobId) {
    let job;
    try {
      job = await api("GET", `v1/jobs/${encodeURIComponent(jobId)}`);
    } catch (err) {
      showError(errorBox, err);
      return;
    }
    if (activeJob !== jobId) return;
    renderJob(job);
    if (job.state === "done" || job.state === "failed") {
      activeJob = null;
      await loadCollections();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, JOB_POLL_MS));
  }
}

function setupUpload() {
  onSubmit($("upload-form"), $("upload-error"), async () => {
    const collection = currentCollection();
    const input = $("files");
    if (!input.files.length) throw new Error("choose one or more files first");
    const form = new FormData();
    for (const file of input.files) form.append("files", file, file.name);
    const job = await api("POST", `${collectionPath(collection)}/files`, { form });
    input.value = "";
    activeJob = job.id;
    renderJob(job);
    pollJob(job.id);
  });
}

// ---------------------------------------------------------------- documents

function documentLink(collection, hit) {
  const link = h("a", { href: documentPath(collection, hit.document_id), className: "doc-link" }, hit.title || hit.document_id);
  link.addEventListener("click", (event) => {
    event.preventDefault();
    openDocument(collection, hit.document_id);
  });
  return link;
}

// A chunk's field (text: the main text), as a badge; nothing when the server sends none.
const fieldBadge = (field) => (field ? h("span", { className: "badge field", title: "field" }, field) : null);

async function openDocument(collection, id) {
  const dialog = $("document-dialog");
  const errorBox = $("document-error");
  clearError(errorBox);
  $("document-title").textContent = id;
  $("document-id").textContent = id;
  $("document-fields").replaceChildren();
  $("document-metadata").textContent = "";
  $("document-chunks").replaceChildren();
  if (!dialog.open) dialog.showModal();
  try {
    const doc = await api("GET", documentPath(collection, id));
    $("document-title").textContent = doc.title || doc.id;
    $("document-fields").replaceChildren(
      ...Object.entries(doc.fields || {}).flatMap(([name, text]) => [h("dt", {}, name), h("dd", {}, text)]),
    );
    $("document-metadata").textContent = JSON.stringify(doc.metadata, null, 2);
    $("document-chunks").replaceChildren(
      ...doc.chunks.map((c) =>
        h("li", { dataset: { field: c.field || "" } }, fieldBadge(c.field), c.field ? " " : null, c.text),
      ),
    );
  } catch (err) {
    showError(errorBox, err);
  }
}

// One result or citation: rank, score, linked title, page and heading, text.
function hitItem(collection, hit) {
  const where = [];
  if (hit.page !== null && hit.page !== undefined) where.push(`page ${hit.page}`);
  if (hit.heading) where.push(hit.heading);
  return h(
    "li",
    { className: "hit", dataset: { documentId: hit.document_id, field: hit.field || "" } },
    h(
      "div",
      { className: "hit-head" },
      h("span", { className: "rank" }, `#${hit.rank}`),
      h("span", { className: "score", title: "score" }, formatScore(hit.score)),
      documentLink(collection, hit),
      hit.title ? h("span", { className: "muted" }, hit.document_id) : null,
      fieldBadge(hit.field),
      where.length ? h("span", { className: "where" }, where.join(" · ")) : null,
    ),
    h("p", { className: "hit-text" }, hit.text),
  );
}

// ---------------------------------------------------------------- adding documents

function addFieldRow(name = "", text = "") {
  const remove = h("button", { type: "button", className: "remove-field" }, "Remove");
  const row = h(
    "li",
    { className: "field-row" },
    h("input", { className: "field-name", value: name, placeholder: "name, e.g. summary", spellcheck: false }),
    h("textarea", { className: "field-text", value: text, rows: 2, placeholder: "text" }),
    remove,
  );
  row.querySelector(".field-name").setAttribute("aria-label", "field name");
  row.querySelector(".field-text").setAttribute("aria-label", "field text");
  remove.addEventListener("click", () => row.remove());
  $("field-rows").append(row);
  return row;
}

// The field rows as {name: text}; rows left wholly empty are skipped, the
// rest go to the server as they are (it says what is wrong with them).
function fieldsFromRows() {
  const fields = {};
  for (const row of $("field-rows").querySelectorAll(".field-row")) {
    const name = row.querySelector(".field-name").value.trim();
    const text = row.querySelector(".field-text").value;
    if (!name && !text.trim()) continue;
    if (Object.hasOwn(fields, name)) throw new Error(`field ${JSON.stringify(name)} is given twice`);
    fields[name] = text;
  }
  return fields;
}

function setupAddDocument() {
  $("add-field").addEventListener("click", () => addFieldRow().querySelector(".field-name").focus());
  onSubmit($("document-form"), $("add-error"), async () => {
    const collection = currentCollection();
    const doc = { text: $("doc-text").value };
    const id = $("doc-id").value.trim();
    const title = $("doc-title").value.trim();
    const fields = fieldsFromRows();
    if (id) doc.id = id;
    if (title) doc.title = title;
    if (Object.keys(fields).length) doc.fields = fields;
    $("add-status").textContent = "adding…";
    try {
      const result = await api("POST", `${collectionPath(collection)}/documents`, { json: { documents: [doc] } });
      const [first] = result.results;
      $("add-status").textContent = `${first.id}: ${first.status}`;
    } catch (err) {
      $("add-status").textContent = "";
      throw err;
    }
    for (const input of [$("doc-id"), $("doc-title"), $("doc-text")]) input.value = "";
    $("field-rows").replaceChildren();
    await loadCollections();
  });
}

// ---------------------------------------------------------------- search

// "title, summary" -> ["title", "summary"]; empty: every field (null).
function chosenFields(value) {
  const names = value.split(/[\s,]+/).filter(Boolean);
  return names.length ? names : null;
}

function setupSearch() {
  onSubmit($("search-form"), $("search-error"), async () => {
    const collection = currentCollection();
    const body = { query: $("query").value, k: Number($("search-k").value) };
    if ($("mode").value) body.mode = $("mode").value; // empty: the server's default mode
    const fields = chosenFields($("search-fields").value);
    if (fields) body.fields = fields;
    $("search-summary").textContent = "searching…";
    $("results").replaceChildren();
    try {
      const found = await api("POST", `${collectionPath(collection)}/search`, { json: body });
      const n = found.results.length;
      $("search-summary").textContent = n
        ? `${n} result${n === 1 ? "" : "s"} (${found.mode}) in ${Math.round(found.took_ms)} ms`
        : "no results";
      $("results").replaceChildren(...found.results.map((hit) => hitItem(collection, hit)));
    } catch (err) {
      $("search-summary").textContent = "";
      throw err;
    }
  });
}

// ---------------------------------------------------------------- answers

function renderCitations(collection, citations) {
  $("citations").replaceChildren(...(citations || []).map((c) => hitItem(collection, c)));
}

function renderHallucination(check) {
  if (!check) return;
  $("hallucination").hidden = false;
  const label = $("hallucination-label");
  label.textContent = check.label;
  label.className = `badge ${check.label === "supported" ? "ok" : "warn"}`;
  $("hallucination-score").textContent = formatScore(check.score);
  $("hallucination-threshold").textContent = formatScore(check.threshold);
  $("sentences").replaceChildren(
    ...(check.sentences || []).map((s) =>
      h(
        "li",
        { className: s.label === "supported" ? "ok" : "warn" },
        h("span", { className: "badge" }, `${s.label} ${formatScore(s.score)}`),
        " ",
        s.text,
      ),
    ),
  );
}

function renderAnswer(collection, result) {
  // No answer (nothing matched, or the model said nothing): the server's note says why.
  $("answer-text").textContent = result.answer || result.note || "";
  renderCitations(collection, result.citations);
  renderHallucination(result.hallucination);
  $("answer-model").textContent = result.model ? `model ${result.model}` : "";
}

// Reads the text/event-stream answer: token events grow the answer text;
// citations, hallucination and done (the full response) complete it.
async function readAnswerStream(collection, response) {
  const events = response.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
  const reader = events.getReader();
  const answerText = $("answer-text");
  for (;;) {
    const { value: event, done } = await reader.read();
    if (done) throw new Error("the answer stream ended before its done event");
    const data = JSON.parse(event.data);
    switch (event.event) {
      case "token":
        answerText.append(data.text);
        break;
      case "citations":
        renderCitations(collection, data);
        break;
      case "hallucination":
        renderHallucination(data);
        break;
      case "done":
        renderAnswer(collection, data);
        await reader.cancel();
        return;
      case "error":
        await reader.cancel();
        throw new ApiError(response.status, data.error?.code || "answer_failed", data.error?.message || "answer failed");
      default:
        break; // unknown events are for newer pages
    }
  }
}

function setupAnswer() {
  onSubmit($("answer-form"), $("answer-error"), async () => {
    const collection = currentCollection();
    const body = { question: $("question").value, k: Number($("answer-k").value), stream: true };
    const status = $("answer-status");
    const output = $("answer-output");
    $("answer-text").textContent = "";
    $("citations").replaceChildren();
    $("sentences").replaceChildren();
    $("hallucination").hidden = true;
    $("answer-model").textContent = "";
    output.hidden = false;
    output.dataset.state = "streaming";
    status.textContent = "answering…";
    const started = performance.now();
    try {
      const response = await send("POST", `${collectionPath(collection)}/answer`, {
        json: body,
        accept: "text/event-stream",
      });
      if ((response.headers.get("Content-Type") || "").includes("text/event-stream")) {
        await readAnswerStream(collection, response);
      } else {
        renderAnswer(collection, await response.json());
      }
      output.dataset.state = "done";
      status.textContent = `answered in ${((performance.now() - started) / 1000).toFixed(1)} s`;
    } catch (err) {
      output.dataset.state = "failed";
      status.textContent = "";
      throw err;
    }
  });
}

// ---------------------------------------------------------------- start

setupKey();
setupCollections();
setupUpload();
setupAddDocument();
setupSearch();
setupAnswer();
loadCollections();
document.body.dataset.ready = "true";
