// MaskAttn gate viewer: turns "MaskAttn Preview Gates" into an interactive viewer on the canvas.
//
// The node's Python side sends every recorded layer x step x word map (uint8, base64) in a "maskattn.gates"
// websocket message when it runs; this extension draws the chosen map as a heatmap over the generated image, with
// a layer slider (last position = mean over layers), a step slider (last position = mean over steps), one chip per
// prompt word, and a gate/probability switch. Works with the 2024 frontend and the current one (1.27+): it only
// uses app.registerExtension, api events and node.addDOMWidget.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_CLASS = "MaskAttnPreviewGates";
const EVENT = "maskattn.gates";
const CMAP = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
  [250, 193, 39], [252, 255, 164]]; // same colour map as the grid image (dark = suppressed, bright = kept)

const viewers = new Map(); // node id (string) -> GateViewer
const pending = new Map(); // node id -> payload that arrived before its viewer existed

function colour(v) {
  const x = Math.min(Math.max(v, 0), 1) * (CMAP.length - 1);
  const i = Math.min(Math.floor(x), CMAP.length - 2);
  const t = x - i;
  const a = CMAP[i], b = CMAP[i + 1];
  return [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t];
}

function decode(b64) {
  const bin = atob(b64 || "");
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function el(tag, style, props) {
  const e = document.createElement(tag);
  if (style) e.style.cssText = style;
  if (props) Object.assign(e, props);
  return e;
}

class GateViewer {
  constructor(node) {
    this.node = node;
    this.data = null;
    this.token = 0;
    this.kind = "gate";
    this.image = null;
    // The frontend sets the widget element's style.display itself (the 2024 one resets it to the default), so the
    // flex layout lives on an inner box.
    this.root = el("div", "overflow:hidden;");
    this.root.className = "maskattn-viewer";
    this.box = el("div", "display:flex;flex-direction:column;gap:4px;height:100%;font:11px sans-serif;color:#ddd;" +
      "background:#1b1b1f;border-radius:6px;padding:4px;box-sizing:border-box;overflow:hidden;");
    this.root.append(this.box);
    this.canvas = el("canvas", "width:100%;height:0;flex:1 1 auto;min-height:80px;object-fit:contain;" +
      "border-radius:4px;");
    this.canvas.width = 384;
    this.canvas.height = 384;
    this.canvas.className = "maskattn-canvas";
    this.layer = this.slider("layer");
    this.step = this.slider("step");
    this.chips = el("div", "display:flex;flex-wrap:wrap;gap:3px;max-height:64px;overflow:auto;");
    this.chips.className = "maskattn-tokens";
    const modes = el("div", "display:flex;gap:4px;align-items:center;");
    this.modeButtons = ["gate", "probability"].map((kind) => {
      const b = el("button", "font:11px sans-serif;padding:1px 6px;border-radius:8px;border:1px solid #555;" +
        "background:#2a2a30;color:#ddd;cursor:pointer;", { textContent: kind });
      b.dataset.kind = kind;
      b.addEventListener("click", () => { this.kind = kind; this.draw(); });
      modes.append(b);
      return b;
    });
    this.status = el("span", "opacity:0.75;margin-left:6px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;");
    this.status.className = "maskattn-status";
    modes.append(this.status);
    this.box.append(this.canvas, this.layer.row, this.step.row, this.chips, modes);
    this.message("Run the workflow: the gates of the last run appear here.");
  }

  slider(role) {
    const row = el("label", "display:flex;align-items:center;gap:6px;");
    const name = el("span", "width:34px;", { textContent: role });
    const input = el("input", "flex:1 1 auto;min-width:40px;", { type: "range", min: 0, max: 0, value: 0, step: 1 });
    input.dataset.role = role;
    const value = el("span", "width:150px;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;");
    input.addEventListener("input", () => this.draw());
    // keep LiteGraph from dragging the node while the slider moves
    for (const evt of ["pointerdown", "mousedown"]) input.addEventListener(evt, (e) => e.stopPropagation());
    row.append(name, input, value);
    return { row, input, value };
  }

  message(text) {
    this.data = null;
    this.status.textContent = "";
    const ctx = this.canvas.getContext("2d");
    ctx.fillStyle = "#221616";
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.fillStyle = "#f3d3c8";
    ctx.font = "13px sans-serif";
    let y = 24, line = "";
    for (const word of String(text).split(/\s+/)) {
      if (ctx.measureText(line + " " + word).width > this.canvas.width - 24) {
        ctx.fillText(line, 12, y);
        y += 18;
        line = word;
      } else line = line ? line + " " + word : word;
    }
    ctx.fillText(line, 12, y);
  }

  set(payload) {
    if (payload.message) {
      this.message(payload.message);
      return;
    }
    const L = payload.layers.length, S = payload.steps.length, K = payload.tokens.length;
    this.data = {
      ...payload, L, S, K,
      gate: decode(payload.gate), probability: decode(payload.probability), present: decode(payload.present),
    };
    this.layer.input.max = L; // L = mean over layers
    this.step.input.max = S; // S = mean over steps
    if (+this.layer.input.value > L) this.layer.input.value = L;
    if (+this.step.input.value > S) this.step.input.value = S;
    if (!this.seen) {
      this.layer.input.value = L;
      this.step.input.value = S;
      this.seen = true;
    }
    this.token = Math.min(this.token, Math.max(K - 1, 0));
    this.chips.replaceChildren(...payload.tokens.map((t, k) => {
      const b = el("button", "font:11px sans-serif;padding:1px 6px;border-radius:8px;border:1px solid #555;" +
        "background:#2a2a30;color:#ddd;cursor:pointer;", { textContent: t.word });
      b.dataset.token = k;
      b.addEventListener("click", () => { this.token = k; this.draw(); });
      return b;
    }));
    const h = payload.h, w = payload.w;
    const aspect = h / w;
    this.canvas.height = Math.round(this.canvas.width * aspect);
    this.image = null;
    if (payload.image) {
      const img = new Image();
      const p = payload.image;
      img.onload = () => { this.image = img; this.draw(); };
      img.src = api.apiURL(`/view?filename=${encodeURIComponent(p.filename)}&type=${p.type}` +
        `&subfolder=${encodeURIComponent(p.subfolder || "")}&rand=${Math.random()}`);
    }
    this.draw();
  }

  heat() {
    const d = this.data;
    const { L, S, K, h, w } = d;
    const src = this.kind === "probability" ? d.probability : d.gate;
    const li = +this.layer.input.value, si = +this.step.input.value;
    const layers = li >= L ? [...Array(L).keys()] : [li];
    const steps = si >= S ? [...Array(S).keys()] : [si];
    const out = new Float32Array(h * w);
    let n = 0;
    for (const l of layers) {
      for (const s of steps) {
        if (!d.present[l * S + s]) continue;
        const base = ((l * S + s) * K + this.token) * h * w;
        for (let i = 0; i < h * w; i++) out[i] += src[base + i];
        n++;
      }
    }
    for (let i = 0; i < h * w; i++) out[i] = n ? out[i] / (255 * n) : 0;
    return { values: out, n, layers, steps };
  }

  draw() {
    const d = this.data;
    if (!d) return;
    const ctx = this.canvas.getContext("2d");
    const W = this.canvas.width, H = this.canvas.height;
    const { L, S, h, w } = d;
    const li = +this.layer.input.value, si = +this.step.input.value;
    this.layer.value.textContent = li >= L ? `mean of ${L} layers` : `${d.layers[li].name} (${d.layers[li].stage})`;
    this.step.value.textContent = si >= S ? `mean of ${S} steps` : d.steps[si].label;
    for (const b of this.chips.children) {
      b.style.background = +b.dataset.token === this.token ? "#d4813a" : "#2a2a30";
    }
    for (const b of this.modeButtons) b.style.background = b.dataset.kind === this.kind ? "#3d5a8a" : "#2a2a30";
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, W, H);
    if (this.image) ctx.drawImage(this.image, 0, 0, W, H);
    const { values, n } = this.heat();
    const off = document.createElement("canvas");
    off.width = w;
    off.height = h;
    const octx = off.getContext("2d");
    const img = octx.createImageData(w, h);
    for (let i = 0; i < h * w; i++) {
      const c = colour(values[i]);
      img.data[4 * i] = c[0];
      img.data[4 * i + 1] = c[1];
      img.data[4 * i + 2] = c[2];
      img.data[4 * i + 3] = 255;
    }
    octx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.globalAlpha = this.image ? (d.opacity ?? 0.6) : 1;
    ctx.drawImage(off, 0, 0, W, H);
    ctx.globalAlpha = 1;
    // caption and colour bar
    const word = d.tokens[this.token]?.word ?? "";
    ctx.fillStyle = "rgba(0,0,0,0.6)";
    ctx.fillRect(0, 0, W, 20);
    ctx.fillStyle = "#fff";
    ctx.font = "12px sans-serif";
    ctx.fillText(`${word} · ${this.layer.value.textContent} · ${this.step.value.textContent}`, 6, 14);
    for (let x = 0; x < 80; x++) {
      const c = colour(x / 79);
      ctx.fillStyle = `rgb(${c[0] | 0},${c[1] | 0},${c[2] | 0})`;
      ctx.fillRect(W - 90 + x, H - 14, 1, 8);
    }
    this.status.textContent = n ? `${d.summary}` : "not recorded at this layer/step";
  }
}

function viewerFor(id) {
  const nodes = app.graph?._nodes ?? app.graph?.nodes ?? [];
  const node = Array.from(nodes).find((n) => String(n.id) === id && n.maskattnViewer);
  return node?.maskattnViewer ?? viewers.get(id);
}

function attach(node) {
  if (node.maskattnViewer) return node.maskattnViewer;
  const viewer = new GateViewer(node);
  node.maskattnViewer = viewer;
  node.addDOMWidget("maskattn_viewer", "maskattn-viewer", viewer.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => 420,
    getHeight: () => 480,
  });
  viewers.set(String(node.id), viewer);
  const waiting = pending.get(String(node.id));
  if (waiting) {
    pending.delete(String(node.id));
    viewer.set(waiting);
  }
  return viewer;
}

app.registerExtension({
  name: "MaskAttn.GateViewer",
  setup() {
    // Registered in setup(): the frontend only dispatches custom websocket messages that have a listener.
    api.addEventListener(EVENT, (event) => {
      const payload = event.detail || {};
      const id = String(payload.node ?? "");
      const viewer = viewerFor(id);
      if (viewer && viewer.node.graph) viewer.set(payload);
      else pending.set(id, payload);
    });
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_CLASS) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      attach(this);
      if (this.size && this.size[1] < 760) this.setSize?.([Math.max(this.size[0], 460), 760]);
      return r;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      if (viewers.get(String(this.id)) === this.maskattnViewer) viewers.delete(String(this.id));
      return removed?.apply(this, arguments);
    };
  },
  loadedGraphNode(node) {
    // ids are assigned when a saved graph is configured: index the viewer under its final id
    if (node.maskattnViewer) viewers.set(String(node.id), node.maskattnViewer);
  },
});

// For tests and for other extensions: the viewers by node id.
window.MaskAttnViewers = viewers;
