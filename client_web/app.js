// DaGAN live avatar: browser client (no build step). Talks to the server's JSON API and WebRTC.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  source: $("source"), file: $("file"), drop: $("drop"), sample: $("sample"),
  local: $("local"), avatar: $("avatar"), start: $("start"), stop: $("stop"),
  recalibrate: $("recalibrate"), depth: $("depth"), state: $("state"), stats: $("stats"),
  picture: $("picture"), autoNeutral: $("auto-neutral"),
  mouth: $("mouth"), mouthValue: $("mouth-value"), mouthControl: $("mouth-control"),
  message: $("message"), untrained: $("untrained"),
};

// Exposed for debugging and for the browser test.
const state = (window.dagan = {
  config: null, photo: null, sessionId: null, pc: null, channel: null, camera: null,
  serverMs: null, framesFromServer: 0, noFaceFrames: 0, statsPrev: null, timer: null, stateTimer: null,
  checking: 0,
});
const EMPTY_STATS = "fps: –   round trip: –   server: –";

// The access token (servers started with --access-token): given once in the link as #token=..., kept
// for this tab only, and removed from the address bar so it is not bookmarked or shared by accident.
const token = (() => {
  const match = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (match) {
    try { sessionStorage.setItem("dagan-token", decodeURIComponent(match[1])); } catch (_) { /* private mode */ }
    history.replaceState(null, "", location.pathname + location.search);
    return decodeURIComponent(match[1]);
  }
  try { return sessionStorage.getItem("dagan-token"); } catch (_) { return null; }
})();
const auth = () => (token ? { Authorization: `Bearer ${token}` } : {});

function show(text, kind = "info") {
  ui.message.textContent = text;
  ui.message.className = "banner" + (kind === "error" ? " error" : "");
  ui.message.hidden = !text;
}

function setState(text) { ui.state.textContent = text; }

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body, headers = {}) {
  const res = await fetch(path, { method, body, headers: { ...auth(), ...headers } });
  if (res.ok) return res.status === 204 ? null : res.json();
  let info = { error: "http_error", message: `${method} ${path} failed (${res.status})` };
  try { info = await res.json(); } catch (_) { /* not JSON */ }
  throw new ApiError(res.status, info.error, info.message);
}

// What a person should read for each refusal (the server's message adds the details).
function explain(err) {
  if (err instanceof ApiError) {
    if (err.code === "server_busy") return "Server busy: every session slot is in use. Please try again in a minute.";
    if (err.code === "no_face") return "No face found in the photo. Choose a photo with one clearly visible, frontal face.";
    if (err.code === "unauthorized")
      return "This server needs an access token: open the link you were given (it ends in #token=…).";
    return err.message;
  }
  if (err && (err.name === "NotAllowedError" || err.name === "SecurityError"))
    return "Camera permission denied. Allow camera access for this page (address bar → site settings) and press Start again.";
  if (err && (err.name === "NotFoundError" || err.name === "OverconstrainedError"))
    return "No camera found. Connect a webcam and press Start again.";
  if (err && err.name === "NotReadableError") return "The camera is in use by another application.";
  return String(err && err.message ? err.message : err);
}

// ------------------------------------------------------------------------------------------ photo
function showPhoto(blob) {
  if (ui.source.src.startsWith("blob:")) URL.revokeObjectURL(ui.source.src);
  if (blob) ui.source.src = URL.createObjectURL(blob);
  else ui.source.removeAttribute("src");
}

function setPhoto(blob) {
  state.photo = blob;
  showPhoto(blob);
  ui.start.disabled = !!state.pc || !blob;
  if (state.sessionId && blob) uploadPhoto().catch((e) => show(explain(e), "error"));
}

// A chosen photo is checked before it replaces the current one (size here, then decoding and the face
// on the server), so a bad photo is reported at once, not after the camera and a session were started.
async function choosePhoto(file) {
  const limit = state.config ? state.config.max_upload_bytes : Infinity;
  const refuse = (text) => {
    state.photo = null;
    showPhoto(null);
    ui.file.value = "";
    ui.start.disabled = true;
    show(text, "error");
  };
  if (file.size > limit)
    return refuse(`The photo is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ${limit / 2 ** 20} MB.`);
  if (file.type && !file.type.startsWith("image/")) return refuse("That file is not an image: choose a JPEG, PNG or WebP photo.");
  const ticket = ++state.checking;
  ui.start.disabled = true;
  show("Checking the photo…");
  try {
    const form = new FormData();
    form.append("file", file, file.name || "photo.jpg");
    await api("POST", "/api/source-check", form);
    if (ticket !== state.checking) return; // a newer choice replaced this one
    show("");
    setPhoto(file);
  } catch (err) {
    if (ticket === state.checking) refuse(explain(err));
  }
}

async function loadSample() {
  const res = await fetch("/api/sample-source", { headers: auth() });
  if (!res.ok) {
    let info = {};
    try { info = await res.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, info.error || "http_error", info.message || "could not load the sample photo");
  }
  setPhoto(await res.blob());
}

async function uploadPhoto() {
  const form = new FormData();
  form.append("file", state.photo, state.photo.name || "photo.jpg");
  const info = await api("PUT", `/api/sessions/${state.sessionId}/source`, form);
  // a model that blinks, a photo whose eyelids were not found: say so rather than leave it a mystery
  show(state.config && state.config.blinks && info && info.blinks === false
    ? "The avatar will not blink: this photo's eyelids were not found." : "");
}

ui.file.addEventListener("change", () => { if (ui.file.files[0]) choosePhoto(ui.file.files[0]); });
ui.sample.addEventListener("click", () => loadSample().catch((e) => show(explain(e), "error")));
ui.drop.addEventListener("dragover", (e) => { e.preventDefault(); ui.drop.classList.add("over"); });
ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
ui.drop.addEventListener("drop", (e) => {
  e.preventDefault();
  ui.drop.classList.remove("over");
  const f = e.dataTransfer.files[0];
  if (f) choosePhoto(f);
});

// ------------------------------------------------------------------------------------------- call
function waitForIce(pc, ms = 3000) {
  // The server takes one offer with every candidate in it (no trickle ICE).
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ms);
  });
}

function onServerMessage(ev) {
  let msg;
  try { msg = JSON.parse(ev.data); } catch (_) { return; }
  if (msg.type === "frame") {
    state.framesFromServer += 1;
    state.serverMs = state.serverMs === null ? msg.server_ms : 0.9 * state.serverMs + 0.1 * msg.server_ms;
    state.noFaceFrames = msg.face ? 0 : state.noFaceFrames + 1;
    if (state.noFaceFrames === 15) show("No face found in the camera picture: face the camera, with enough light.");
    if (msg.face && ui.message.textContent.startsWith("No face found in the camera")) show("");
  } else if (msg.type === "recalibrated") {
    setState("recalibrated: your current pose is the neutral one");
    clearTimeout(state.stateTimer);  // back to the connection state after a moment
    state.stateTimer = setTimeout(() => { if (state.pc) setState(state.pc.connectionState); }, 2500);
  } else if (msg.type === "error") {
    // Also the server's "why": bad_video (the camera's frames cannot be used), rate_limited (messages).
    state.badVideo = msg.error === "bad_video" ? msg.message : state.badVideo;
    show(msg.message, "error");
  } else if (msg.type === "video_ok") {
    if (state.badVideo && ui.message.textContent === state.badVideo) show("");
    state.badVideo = null;
  }
}

async function start() {
  ui.start.disabled = true;
  show("");
  try {
    setState("starting camera…");
    state.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    ui.local.srcObject = state.camera;

    setState("creating session…");
    // The picture (face crop or full photo) and the automatic neutral pose are per-session settings.
    const options = { show_depth: ui.depth.checked, picture: ui.picture.value, auto_neutral: ui.autoNeutral.checked };
    if (!ui.mouthControl.hidden) options.mouth_gain = Number(ui.mouth.value);  // the lips' gain, if the model has one
    const session = await api("POST", "/api/sessions", JSON.stringify(options),
      { "Content-Type": "application/json" });
    state.sessionId = session.id;
    setState("uploading photo…");
    await uploadPhoto();

    setState("connecting…");
    // The session's ICE list carries TURN credentials minted for it (they expire); the config's is a fallback.
    const pc = (state.pc = new RTCPeerConnection({ iceServers: session.ice_servers || state.config.ice_servers }));
    state.channel = pc.createDataChannel("control");
    state.channel.onmessage = onServerMessage;
    for (const track of state.camera.getVideoTracks()) pc.addTrack(track, state.camera);
    pc.ontrack = (ev) => { ui.avatar.srcObject = ev.streams[0] || new MediaStream([ev.track]); };
    pc.onconnectionstatechange = () => {
      setState(pc.connectionState);
      if (pc.connectionState === "failed") show("The connection to the server failed (network or firewall). Press Start to retry.", "error");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    const answer = await api("POST", `/api/sessions/${state.sessionId}/offer`,
      JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }), { "Content-Type": "application/json" });
    await pc.setRemoteDescription(answer);
    ui.stop.disabled = false;
    ui.recalibrate.disabled = false;
    state.timer = setInterval(updateStats, 1000);
  } catch (err) {
    show(explain(err), "error");
    await stop(false);
  }
}

async function stop(clearMessage = true) {
  clearInterval(state.timer);
  clearTimeout(state.stateTimer);
  state.timer = null;
  if (state.pc) state.pc.close();
  if (state.camera) state.camera.getTracks().forEach((t) => t.stop());
  if (state.sessionId) {
    const id = state.sessionId;
    state.sessionId = null;
    fetch(`/api/sessions/${id}`, { method: "DELETE", keepalive: true, headers: auth() }).catch(() => {});
  }
  Object.assign(state, { pc: null, channel: null, camera: null, statsPrev: null, serverMs: null, framesFromServer: 0, noFaceFrames: 0 });
  ui.stats.textContent = EMPTY_STATS;
  ui.local.srcObject = null;
  ui.avatar.srcObject = null;
  ui.start.disabled = !state.photo;
  ui.stop.disabled = true;
  ui.recalibrate.disabled = true;
  setState("idle");
  if (clearMessage) show("");
}

function send(msg) {
  if (state.channel && state.channel.readyState === "open") state.channel.send(JSON.stringify(msg));
}

// fps from the decoded-frame counter, round trip from the ICE candidate pair (RTCP-based).
async function updateStats() {
  const pc = state.pc;
  if (!pc) return;
  const report = await pc.getStats();
  if (pc !== state.pc) return; // stopped while the stats were gathered: keep them cleared
  let frames = null, rtt = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") frames = s.framesDecoded;
    if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded" && s.currentRoundTripTime !== undefined)
      rtt = s.currentRoundTripTime;
  });
  const now = performance.now();
  let fps = null;
  if (frames !== null && state.statsPrev) fps = (frames - state.statsPrev.frames) / ((now - state.statsPrev.t) / 1000);
  if (frames !== null) state.statsPrev = { frames, t: now };
  const f = (v, d, unit) => (v === null || v === undefined ? "–" : v.toFixed(d) + unit);
  ui.stats.textContent = `fps: ${f(fps, 1, "")}   round trip: ${f(rtt === null ? null : rtt * 1000, 0, " ms")}` +
    `   server: ${f(state.serverMs, 0, " ms")} per frame`;
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", () => stop());
ui.recalibrate.addEventListener("click", () => send({ type: "recalibrate" }));
ui.depth.addEventListener("change", () => send({ type: "show_depth", value: ui.depth.checked }));
ui.picture.addEventListener("change", () => send({ type: "picture", value: ui.picture.value }));
// The mouth gain: the label follows the slider at once, the server hears it on release (one message, not a
// burst over the session's message rate).
ui.mouth.addEventListener("input", () => { ui.mouthValue.textContent = Number(ui.mouth.value).toFixed(1) + "×"; });
ui.mouth.addEventListener("change", () => send({ type: "mouth_gain", value: Number(ui.mouth.value) }));
window.addEventListener("pagehide", () => {
  if (state.sessionId) fetch(`/api/sessions/${state.sessionId}`, { method: "DELETE", keepalive: true, headers: auth() });
});

(async function init() {
  try {
    state.config = await api("GET", "/api/config");
    ui.untrained.hidden = !state.config.untrained;
    if (state.config.picture) ui.picture.value = state.config.picture;  // the server's default
    ui.autoNeutral.checked = !!state.config.auto_neutral;
    if (typeof state.config.mouth_gain === "number") {  // the model's own lip-opening gain; null: it has none
      ui.mouth.value = state.config.mouth_gain;
      ui.mouthValue.textContent = state.config.mouth_gain.toFixed(1) + "×";
      ui.mouthControl.hidden = false;
    }
    if (!navigator.mediaDevices || !window.RTCPeerConnection)
      show("This browser cannot use the camera here: open the page over https:// or on localhost.", "error");
    await loadSample();
    setState("ready: press Start camera");
  } catch (err) {
    show(explain(err), "error");
  }
})();
