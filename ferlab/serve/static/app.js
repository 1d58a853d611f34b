// ferlab serve: upload a photo or capture a webcam frame, POST it to /predict, draw the boxes, bars and overlays.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    info: $("model-info"), limits: $("limits"), drop: $("drop-zone"), file: $("file-input"),
    camStart: $("webcam-start"), camPanel: $("webcam-panel"), video: $("webcam-video"),
    camCapture: $("webcam-capture"), camStop: $("webcam-stop"),
    error: $("error"), status: $("status"), results: $("results"), stage: $("stage"), photo: $("photo"),
    faces: $("faces"), template: $("face-template"),
  };
  const state = { info: null, photoUrl: null, stream: null, busy: false };

  const pct = (p) => `${(100 * p).toFixed(1)}%`;
  const METHOD_NAMES = {
    gradcam: "Grad-CAM", "guided-gradcam": "Guided Grad-CAM", saliency: "Saliency", smoothgrad: "SmoothGrad",
    "integrated-gradients": "Integrated gradients", occlusion: "Occlusion",
  };

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  function setStatus(message) {
    els.status.textContent = message || "";
  }

  function setBusy(busy) {
    state.busy = busy;
    document.body.classList.toggle("busy", busy);
    els.file.disabled = busy;
    els.camCapture.disabled = busy;
  }

  async function loadInfo() {
    try {
      const res = await fetch("/api/info");
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      state.info = await res.json();
      const lim = state.info.limits;
      els.info.textContent = `Model: ${state.info.model} (weights ${state.info.weights}) · classes: ${state.info.classes.join(", ")}`;
      els.limits.textContent = `JPEG, PNG or WebP, up to ${lim.max_upload_mb} MB.`;
    } catch (err) {
      els.info.textContent = "";
      showError(`Could not reach the ferlab server (${err.message}).`);
    }
  }

  function checkFile(file) {
    const lim = state.info && state.info.limits;
    if (!lim) return null;
    if (file.type && !lim.types.includes(file.type)) {
      return `${file.name}: ${file.type} is not supported; choose a JPEG, PNG or WebP image.`;
    }
    if (file.size > lim.max_upload_bytes) {
      return `${file.name}: ${(file.size / 2 ** 20).toFixed(1)} MB is over the limit of ${lim.max_upload_mb} MB.`;
    }
    return null;
  }

  function showPhoto(blob) {
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.photoUrl = URL.createObjectURL(blob);
    els.photo.src = state.photoUrl;
  }

  function clearResults() {
    els.stage.querySelectorAll(".face-box").forEach((b) => b.remove());
    els.faces.replaceChildren();
  }

  async function analyse(blob, name) {
    if (state.busy) return;
    showError("");
    const problem = checkFile(blob instanceof File ? blob : new File([blob], name, { type: blob.type }));
    if (problem) {
      showError(problem);
      return;
    }
    clearResults();
    showPhoto(blob);
    els.results.hidden = false;
    setStatus("Analysing…");
    setBusy(true);
    try {
      const body = new FormData();
      body.append("file", blob, name);
      const res = await fetch("/predict", { method: "POST", body });
      let data = null;
      try {
        data = await res.json();
      } catch (err) {
        data = null;
      }
      if (!res.ok) {
        const detail = data && (data.error || data.detail);
        throw new Error(`${detail || "the server could not analyse this image"} (HTTP ${res.status})`);
      }
      render(data);
    } catch (err) {
      setStatus("");
      showError(`Analysis failed: ${err.message}`);
    } finally {
      setBusy(false);
    }
  }

  function render(data) {
    clearResults();
    const n = data.faces.length;
    setStatus(n ? `${n} face${n > 1 ? "s" : ""} found · model ${data.model} (weights ${data.weights})` : (data.message || "No face found."));
    const classes = (state.info && state.info.classes) || Object.keys(n ? data.faces[0].probabilities : {});
    data.faces.forEach((face, i) => {
      els.stage.appendChild(faceBox(face, i, data.width, data.height));
      els.faces.appendChild(faceCard(face, i, classes, data));
    });
  }

  function faceBox(face, i, width, height) {
    const [x, y, w, h] = face.box;
    const box = document.createElement("div");
    box.className = "face-box";
    box.dataset.index = String(i);
    box.style.left = `${(100 * x) / width}%`;
    box.style.top = `${(100 * y) / height}%`;
    box.style.width = `${(100 * w) / width}%`;
    box.style.height = `${(100 * h) / height}%`;
    if (y / height < 0.08) box.classList.add("label-below");
    const label = document.createElement("span");
    label.className = "face-label";
    label.dataset.label = face.label;
    label.textContent = `${i + 1}. ${face.label} ${pct(face.score)}`;
    box.appendChild(label);
    box.setAttribute("role", "img");
    box.setAttribute("aria-label", `Face ${i + 1}: ${face.label}, ${pct(face.score)}`);
    return box;
  }

  function faceCard(face, i, classes, data) {
    const card = els.template.content.firstElementChild.cloneNode(true);
    card.dataset.index = String(i);
    card.querySelector(".face-title").textContent = `Face ${i + 1}: ${face.label} (${pct(face.score)})`;
    const cam = card.querySelector(".gradcam");
    const caption = card.querySelector("figcaption");
    if (face.gradcam) {
      cam.src = face.gradcam;
      cam.alt = `Heat map of the regions that drove the prediction ${face.label} for face ${i + 1}`;
      const method = data.explain_method || "gradcam";
      caption.textContent = METHOD_NAMES[method] || method;
    } else {
      cam.remove();
      caption.textContent = "No heat map for this model.";
    }
    const bars = card.querySelector(".bars");
    for (const name of classes) {
      const p = face.probabilities[name] ?? 0;
      const li = document.createElement("li");
      li.className = "bar" + (name === face.label ? " is-top" : "");
      li.dataset.class = name;
      li.dataset.p = String(p);
      li.setAttribute("aria-label", `${name}: ${pct(p)}`);
      const label = document.createElement("span");
      label.className = "name";
      label.textContent = name;
      const track = document.createElement("span");
      track.className = "track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = pct(p);
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "pct";
      value.textContent = pct(p);
      li.append(label, track, value);
      bars.appendChild(li);
    }
    return card;
  }

  // ---------------------------------------------------------------- file input and drag and drop
  els.file.addEventListener("change", () => {
    const file = els.file.files && els.file.files[0];
    if (file) analyse(file, file.name);
    els.file.value = "";
  });
  ["dragenter", "dragover"].forEach((type) => els.drop.addEventListener(type, (ev) => {
    ev.preventDefault();
    els.drop.classList.add("dragover");
  }));
  ["dragleave", "drop"].forEach((type) => els.drop.addEventListener(type, () => els.drop.classList.remove("dragover")));
  els.drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const file = ev.dataTransfer && ev.dataTransfer.files[0];
    if (file) analyse(file, file.name);
  });
  // A photo dropped next to the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());

  // ---------------------------------------------------------------- webcam
  function stopWebcam() {
    if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
    state.stream = null;
    els.video.srcObject = null;
    els.camPanel.hidden = true;
    els.camStart.hidden = false;
  }

  els.camStart.addEventListener("click", async () => {
    showError("");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("The webcam is not available in this browser (it needs localhost or https).");
      return;
    }
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 1280, height: 720 }, audio: false });
      els.video.srcObject = state.stream;
      els.camPanel.hidden = false;
      els.camStart.hidden = true;
      els.camCapture.focus();
    } catch (err) {
      showError(`Could not open the webcam: ${err.message || err.name}`);
    }
  });

  els.camStop.addEventListener("click", stopWebcam);

  els.camCapture.addEventListener("click", () => {
    const { videoWidth: w, videoHeight: h } = els.video;
    if (!w || !h) {
      showError("The webcam has not delivered a frame yet; try again in a moment.");
      return;
    }
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").drawImage(els.video, 0, 0, w, h);
    canvas.toBlob((blob) => {
      if (blob) analyse(blob, "webcam.jpg");
      else showError("Could not capture a webcam frame.");
    }, "image/jpeg", 0.92);
  });

  loadInfo();
})();
