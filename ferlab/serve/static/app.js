// ferlab serve: upload a photo or capture a webcam frame, POST it to /predict, draw the boxes, bars and overlays.
// Live tracking sends webcam frames one after another with a stream id: the server tracks the faces across them
// (the same tracker as for videos) and answers track ids and smoothed probabilities.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    info: $("model-info"), limits: $("limits"), drop: $("drop-zone"), file: $("file-input"),
    camStart: $("webcam-start"), camPanel: $("webcam-panel"), video: $("webcam-video"),
    camCapture: $("webcam-capture"), camStop: $("webcam-stop"), camLive: $("webcam-live"),
    error: $("error"), status: $("status"), results: $("results"), stage: $("stage"), photo: $("photo"),
    faces: $("faces"), template: $("face-template"),
  };
  const state = { info: null, photoUrl: null, stream: null, busy: false };
  const live = { on: false, id: "", t0: 0, frames: 0 };
  const LIVE_WIDTH = 640; // live frames are sent at most this wide: what the detector needs, and quick to upload
  const BUSY_WAIT_MS = 1000;

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
    els.camCapture.disabled = busy || live.on;
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
    if (!live.on) setStatus(n ? `${n} face${n > 1 ? "s" : ""} found · model ${data.model} (weights ${data.weights})` : (data.message || "No face found."));
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
    const who = face.track ? `#${face.track}` : `${i + 1}.`;
    label.textContent = `${who} ${face.label} ${pct(face.score)}`;
    box.appendChild(label);
    if (face.track) box.dataset.track = String(face.track);
    box.setAttribute("role", "img");
    box.setAttribute("aria-label", `${face.track ? `Person #${face.track}` : `Face ${i + 1}`}: ${face.label}, ${pct(face.score)}`);
    return box;
  }

  function faceCard(face, i, classes, data) {
    const card = els.template.content.firstElementChild.cloneNode(true);
    card.dataset.index = String(i);
    const who = face.track ? `Person #${face.track}` : `Face ${i + 1}`;
    card.querySelector(".face-title").textContent = `${who}: ${face.label} (${pct(face.score)})`;
    const cam = card.querySelector(".gradcam");
    const caption = card.querySelector("figcaption");
    if (face.gradcam) {
      cam.src = face.gradcam;
      cam.alt = `Heat map of the regions that drove the prediction ${face.label} for face ${i + 1}`;
      const method = data.explain_method || "gradcam";
      caption.textContent = METHOD_NAMES[method] || method;
    } else {
      cam.remove();
      caption.textContent = face.track ? "Smoothed over the last frames; no heat map while live." : "No heat map for this model.";
    }
    const bars = card.querySelector(".bars");
    const shown = face.smoothed || face.probabilities; // live: the track's smoothed probabilities
    for (const name of classes) {
      const p = shown[name] ?? 0;
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
    stopLive();
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

  // One webcam frame as a JPEG blob, at most maxWidth wide (null when the camera has no frame yet).
  function grabFrame(maxWidth, quality) {
    const { videoWidth: w, videoHeight: h } = els.video;
    if (!w || !h) return Promise.resolve(null);
    const scale = Math.min(1, maxWidth / w);
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(w * scale);
    canvas.height = Math.round(h * scale);
    canvas.getContext("2d").drawImage(els.video, 0, 0, canvas.width, canvas.height);
    return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", quality));
  }

  els.camCapture.addEventListener("click", async () => {
    if (!els.video.videoWidth) {
      showError("The webcam has not delivered a frame yet; try again in a moment.");
      return;
    }
    const blob = await grabFrame(Infinity, 0.92);
    if (blob) analyse(blob, "webcam.jpg");
    else showError("Could not capture a webcam frame.");
  });

  // ---------------------------------------------------------------- live tracking
  function stopLive() {
    live.on = false;
    els.camLive.textContent = "Start live tracking";
    els.camLive.setAttribute("aria-pressed", "false");
    els.camCapture.disabled = state.busy;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function liveLoop() {
    const started = performance.now();
    while (live.on && state.stream) {
      const blob = await grabFrame(LIVE_WIDTH, 0.8);
      if (!blob) {
        await sleep(100); // the camera is still starting
        continue;
      }
      try {
        const body = new FormData();
        body.append("file", blob, "frame.jpg");
        const t = ((performance.now() - live.t0) / 1000).toFixed(3);
        const res = await fetch(`/predict?stream=${live.id}&t=${t}&explain=0`, { method: "POST", body });
        if (res.status === 503) { // the server is busy with other images: wait, then go on
          await sleep(BUSY_WAIT_MS);
          continue;
        }
        const data = await res.json().catch(() => null);
        if (!res.ok) {
          const detail = data && (data.error || data.detail);
          throw new Error(`${detail || "the server could not analyse the frame"} (HTTP ${res.status})`);
        }
        if (!live.on) break;
        live.frames += 1;
        showPhoto(blob);
        els.results.hidden = false;
        render(data);
        const fps = live.frames / ((performance.now() - started) / 1000);
        const n = data.faces.length;
        setStatus(`Live: ${n} face${n === 1 ? "" : "s"} · ${fps.toFixed(1)} frames/s · model ${data.model}`);
      } catch (err) {
        showError(`Live tracking stopped: ${err.message}`);
        stopLive();
      }
    }
  }

  els.camLive.addEventListener("click", () => {
    if (live.on) {
      stopLive();
      return;
    }
    showError("");
    live.on = true;
    live.id = `page-${Math.random().toString(36).slice(2, 12)}`; // a fresh stream: new track ids
    live.t0 = performance.now();
    live.frames = 0;
    els.camLive.textContent = "Stop live tracking";
    els.camLive.setAttribute("aria-pressed", "true");
    els.camCapture.disabled = true;
    liveLoop();
  });

  loadInfo();
})();
