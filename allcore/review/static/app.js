"use strict";
// The review app's pages: plain DOM calls against the JSON API of pipelines/review.py.
const $ = (id) => document.getElementById(id);
const percent = (p) => (p === null || p === undefined ? "n/a" : (100 * p).toFixed(1) + " %");

function show(tab) {
  for (const name of ["analyse", "queue", "slides"]) {
    $(name).hidden = name !== tab;
    $("tab-" + name).classList.toggle("active", name === tab);
  }
  if (tab === "queue") loadSpecimens();
  if (tab === "slides") loadSlides();
}
$("tab-analyse").onclick = () => show("analyse");
$("tab-queue").onclick = () => show("queue");
$("tab-slides").onclick = () => show("slides");

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || body.detail || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// ------------------------------------------------------------------ analyse
$("upload-form").onsubmit = async (event) => {
  event.preventDefault();
  const file = $("upload").files[0];
  $("result").hidden = true;
  if (!file) { $("message").textContent = "Choose a field image (JPEG, PNG or TIFF) first."; return; }
  $("message").className = "message ok";
  $("message").textContent = "Analysing " + file.name + " ...";
  const form = new FormData();
  form.append("file", file);
  const response = await fetch("/api/analyse", { method: "POST", body: form });
  if (!response.ok) {
    $("message").className = "message";
    $("message").textContent = await errorText(response);
    return;
  }
  const result = await response.json();
  $("message").textContent = "";
  const field = result.field;
  $("field-call").innerHTML = "";
  $("field-call").append(
    "Field call: ", Object.assign(document.createElement("span"),
      { id: "call", className: "call-" + (field.call || "").replace(" ", "-"), textContent: field.call }),
    " (" + field.pred_label + "), blast probability ",
    Object.assign(document.createElement("span"), { id: "probability", textContent: percent(field.blast_probability) }),
    field.needs_review ? " - needs review: " + field.review_reason
      : (field.review_reason ? " - " + field.review_reason : ""),
    " - " + result.cells.length + " cell(s)");
  $("boxes").src = result.boxes_png;
  $("field-saliency").src = result.field_saliency_png;
  $("cell-saliency").removeAttribute("src");
  const body = $("cells").tBodies[0];
  body.innerHTML = "";
  result.cells.forEach((cell, i) => {
    const row = body.insertRow();
    for (const text of [i + 1, cell.pred_label, percent(cell.blast_probability), cell.call,
                        cell.review_reason || ""]) row.insertCell().textContent = text;
    row.onclick = () => {
      for (const other of body.rows) other.classList.remove("selected");
      row.classList.add("selected");
      $("cell-saliency").src = result.cell_saliency_pngs[i];
      $("cell-caption").textContent = "Grad-CAM, cell " + (i + 1) + " (" + cell.pred_label + ")";
    };
  });
  $("result").hidden = false;
};

// ------------------------------------------------------------------ review queue
// Fetches a JSON list into the emptied element listId: the list and its items, or null after
// writing the server's error into messageId. An empty list shows emptyText.
async function fetchList(url, messageId, listId, emptyText) {
  const response = await fetch(url);
  if (!response.ok) { $(messageId).textContent = await errorText(response); return null; }
  const list = $(listId);
  list.innerHTML = "";
  const items = await response.json();
  if (!items.length) list.textContent = emptyText;
  return { list, items };
}

async function loadSpecimens() {
  const fetched = await fetchList("/api/specimens", "queue-message", "specimens", "Nothing waits for review.");
  if (!fetched) return;
  const { list, items: specimens } = fetched;
  for (const s of specimens) {
    const item = document.createElement("li");
    item.textContent = s.specimen_id + " (" + s.fields + " fields, " + s.cells + " cells)";
    item.dataset.specimen = s.specimen_id;
    item.onclick = () => {
      for (const other of list.children) other.classList.remove("selected");
      item.classList.add("selected");
      loadQueue(s.specimen_id);
    };
    list.append(item);
  }
}

async function loadQueue(specimen) {
  const response = await fetch("/api/queue?specimen=" + encodeURIComponent(specimen));
  if (!response.ok) { $("queue-message").textContent = await errorText(response); return; }
  const items = $("items");
  items.innerHTML = "";
  for (const row of await response.json()) items.append(queueItem(row, specimen));
}

function queueItem(row, specimen) {
  const box = document.createElement("div");
  box.className = "item";
  box.dataset.cellId = row.cell_id;
  const picture = document.createElement("img");
  picture.src = "/api/picture?cell_id=" + encodeURIComponent(row.cell_id);
  const facts = document.createElement("div");
  facts.className = "facts";
  facts.innerHTML = "";
  facts.append(row.row_kind + " " + row.source_uri.split("/").pop(), document.createElement("br"),
    "model: " + row.pred_label + ", blast probability " + percent(row.blast_probability),
    document.createElement("br"), "why: " + (row.review_reason || "") +
    (row.ood_ratio ? " (OOD " + row.ood_ratio.toFixed(2) + " x threshold)" : ""), document.createElement("br"));
  const choice = document.createElement("select");
  for (const cls of row.classes) choice.append(new Option(cls, cls, false, cls === row.pred_label));
  const accept = Object.assign(document.createElement("button"), { textContent: "Accept", className: "accept" });
  const correct = Object.assign(document.createElement("button"), { textContent: "Save label", className: "correct" });
  // one id per decision: a retry of the same decision sends the same id, so it is recorded once
  const decisionId = crypto.randomUUID();
  const send = (label) => decide(row.cell_id, label, decisionId, specimen);
  accept.onclick = () => send(row.pred_label);
  correct.onclick = () => send(choice.value);
  facts.append(choice, " ", correct, " ", accept);
  box.append(picture, facts);
  return box;
}

async function decide(cellId, label, correctionId, specimen) {
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) { $("queue-message").textContent = "Enter your name or initials as reviewer first."; return; }
  const body = JSON.stringify({ correction_id: correctionId, cell_id: cellId, label: label, reviewer: reviewer });
  let response;
  for (let attempt = 0; attempt < 3; attempt++) {  // the same id on every attempt
    try {
      response = await fetch("/api/corrections", { method: "POST", body: body,
        headers: { "Content-Type": "application/json" } });
      break;
    } catch (e) { response = null; }
  }
  if (!response || !response.ok) {
    $("queue-message").className = "message";
    $("queue-message").textContent = response ? await errorText(response) : "The app did not answer; try again.";
    return;
  }
  $("queue-message").className = "message ok";
  $("queue-message").textContent = "Recorded " + label + " for " + cellId + ".";
  await loadQueue(specimen);
  loadSpecimens();
}

// ------------------------------------------------------------------ slides
async function loadSlides() {
  const fetched = await fetchList("/api/slides", "slides-message", "slide-list",
                                  "No slide has been scored into this output.");
  if (!fetched) return;
  const { list, items: slides } = fetched;
  for (const slide of slides) {
    const figure = Object.assign(document.createElement("figure"), { className: "slide" });
    figure.dataset.slide = slide.name;
    const overview = Object.assign(document.createElement("img"), { src: slide.overview, alt: "overview of " + slide.name });
    const geojson = Object.assign(document.createElement("a"), { href: slide.geojson, className: "geojson",
                                                                 textContent: "GeoJSON for QuPath" });
    const caption = document.createElement("figcaption");
    caption.append(slide.name + " - ", geojson);
    figure.append(overview, caption);
    list.append(figure);
  }
}
