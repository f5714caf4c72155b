// MaskAttn on the canvas: the gate viewer on "MaskAttn Preview Gates", the grouping text on "MaskAttn Zero-Shot
// Gates".
//
// The preview node's `ui` output names a JSON file in ComfyUI's temp folder with every recorded layer x step x word
// map (uint8, base64); this extension fetches it and draws the chosen map as a heatmap over the generated image, with
// a layer slider (last position = mean over layers), a step slider (last position = mean over steps), one chip per
// prompt word, and a gate / probability (/ groups, for zero-shot gates) switch. The file's name is kept in the node's
// properties, so the viewer comes back after a page reload, and ComfyUI re-sends the `ui` output when it serves the
// node from its cache. Works with the 2024 frontend and the current one (1.27+): it only uses app.registerExtension,
// api events and node.addDOMWidget.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_CLASS = "MaskAttnPreviewGates";
const ZERO_SHOT_CLASS = "MaskAttnZeroShotGates";
const VIEWER_KEY = "maskattn_viewer"; // the preview node's ui entry, and the node property that remembers it
const NOTICE_EVENT = "maskattn.notice"; // {node, text}: a sampling-time message for a zero-shot node
const IDLE = "Run the workflow: the gates of the last run appear here.";
const GROUP_COLOURS = [[230, 75, 60], [60, 140, 230], [250, 200, 40], [80, 200, 110], [190, 90, 220],
  [250, 140, 40], [60, 210, 210], [240, 110, 180]];
const CMAP = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
  [250, 193, 39], [252, 255, 164]]; // same colour map as the grid image (dark = suppressed, bright = kept)

const viewers = new Map(); // node id (string) -> GateViewer

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

function plural(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
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
    this.modeButtons = ["gate", "probability", "groups"].map((kind) => {
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
    this.message(IDLE);
  }

  // The run named by a `ui` entry ({filename, subfolder, type} of the viewer's JSON, or {message}).
  async load(ref) {
    if (!ref) return;
    if (ref.message) {
      this.ref = ref;
      remember(this.node, VIEWER_KEY, ref);
      this.set({ message: ref.message });
      return;
    }
    if (this.ref && this.ref.filename === ref.filename && this.data) return; // already shown
    this.ref = ref;
    remember(this.node, VIEWER_KEY, ref);
    try {
      const url = api.apiURL(`/view?filename=${encodeURIComponent(ref.filename)}&type=${ref.type || "temp"}` +
        `&subfolder=${encodeURIComponent(ref.subfolder || "")}`);
      const r = await fetch(url, { cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const payload = await r.json();
      if (this.ref === ref) this.set(payload);
    } catch (e) {
      // the server was restarted (its temp folder is emptied at start): nothing to show until the next run
      if (this.ref === ref) this.message(IDLE);
    }
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
    // the word the user picked stays picked across runs; otherwise the run's first word of interest (zero-shot:
    // the first group's first word; else the first word that is not an article)
    const picked = this.picked ? payload.tokens.findIndex((t) => t.word === this.picked) : -1;
    this.token = picked >= 0 ? picked : Math.min(payload.first_token ?? 0, Math.max(K - 1, 0));
    this.data.G = (payload.groups || []).length;
    this.data.group_gate = this.data.G ? decode(payload.group_gate) : null;
    if (this.kind === "groups" && this.data.G < 2) this.kind = "gate";
    for (const b of this.modeButtons) b.style.display = b.dataset.kind === "groups" && this.data.G < 2 ? "none" : "";
    this.chips.replaceChildren(...payload.tokens.map((t, k) => {
      const b = el("button", "font:11px sans-serif;padding:1px 6px;border-radius:8px;border:1px solid #555;" +
        "background:#2a2a30;color:#ddd;cursor:pointer;", { textContent: t.word });
      b.dataset.token = k;
      b.addEventListener("click", () => { this.token = k; this.picked = t.word; this.kind = this.kind === "groups" ?
        "gate" : this.kind; this.draw(); });
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

  // Per cell: the group whose words it keeps most (after averaging the chosen layers and steps), and how much.
  partition() {
    const d = this.data;
    const { L, S, G, h, w } = d;
    const li = +this.layer.input.value, si = +this.step.input.value;
    const layers = li >= L ? [...Array(L).keys()] : [li];
    const steps = si >= S ? [...Array(S).keys()] : [si];
    const sums = new Float32Array(G * h * w);
    let n = 0;
    for (const l of layers) {
      for (const s of steps) {
        if (!d.present[l * S + s]) continue;
        const base = (l * S + s) * G * h * w;
        for (let i = 0; i < G * h * w; i++) sums[i] += d.group_gate[base + i];
        n++;
      }
    }
    const group = new Int16Array(h * w).fill(-1), strength = new Float32Array(h * w);
    for (let i = 0; i < h * w; i++) {
      let best = 0;
      for (let g = 0; g < G; g++) {
        const v = sums[g * h * w + i];
        if (v > best) { best = v; group[i] = g; }
      }
      strength[i] = n ? best / (255 * n) : 0;
    }
    return { group, strength, n };
  }

  draw() {
    const d = this.data;
    if (!d) return;
    const ctx = this.canvas.getContext("2d");
    const W = this.canvas.width, H = this.canvas.height;
    const { L, S, h, w } = d;
    const li = +this.layer.input.value, si = +this.step.input.value;
    const groups = this.kind === "groups" && d.G >= 2;
    this.layer.value.textContent = li >= L ? `mean of ${plural(L, "layer")}` :
      `${d.layers[li].name} (${d.layers[li].stage})`;
    this.step.value.textContent = si >= S ? `mean of ${plural(S, "step")}` : d.steps[si].label;
    for (const b of this.chips.children) {
      b.style.background = !groups && +b.dataset.token === this.token ? "#d4813a" : "#2a2a30";
    }
    for (const b of this.modeButtons) b.style.background = b.dataset.kind === this.kind ? "#3d5a8a" : "#2a2a30";
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, W, H);
    if (this.image) ctx.drawImage(this.image, 0, 0, W, H);
    const { values, n } = groups ? { values: null, n: 0 } : this.heat();
    const part = groups ? this.partition() : null;
    const off = document.createElement("canvas");
    off.width = w;
    off.height = h;
    const octx = off.getContext("2d");
    const img = octx.createImageData(w, h);
    for (let i = 0; i < h * w; i++) {
      let c;
      if (groups) {
        const g = part.group[i];
        const base = g >= 0 ? GROUP_COLOURS[g % GROUP_COLOURS.length] : [40, 40, 44];
        const k = 0.35 + 0.65 * part.strength[i];
        c = [base[0] * k, base[1] * k, base[2] * k];
      } else c = colour(values[i]);
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
    const word = groups ? "groups" : d.tokens[this.token]?.word ?? "";
    ctx.fillStyle = "rgba(0,0,0,0.6)";
    ctx.fillRect(0, 0, W, 20);
    ctx.fillStyle = "#fff";
    ctx.font = "12px sans-serif";
    ctx.fillText(`${word} · ${this.layer.value.textContent} · ${this.step.value.textContent}`, 6, 14);
    if (groups && d.layout?.length === d.G) { // the place the prompt's spatial words gave each group, dashed
      ctx.save();
      ctx.setLineDash([6, 4]);
      ctx.lineWidth = 2;
      d.layout.forEach((p, k) => {
        const c = GROUP_COLOURS[k % GROUP_COLOURS.length];
        ctx.strokeStyle = `rgb(${c[0]},${c[1]},${c[2]})`;
        const inset = 2 + 2 * k;
        ctx.strokeRect(p.x[0] * W + inset, p.y[0] * H + inset, (p.x[1] - p.x[0]) * W - 2 * inset,
          (p.y[1] - p.y[0]) * H - 2 * inset);
      });
      ctx.restore();
    }
    if (groups) { // legend: one swatch per group
      let x = 6;
      d.groups.forEach((g, k) => {
        const c = GROUP_COLOURS[k % GROUP_COLOURS.length];
        ctx.fillStyle = "rgba(0,0,0,0.6)";
        const label = g.name;
        const width = ctx.measureText(label).width + 18;
        ctx.fillRect(x - 2, H - 18, width, 16);
        ctx.fillStyle = `rgb(${c[0]},${c[1]},${c[2]})`;
        ctx.fillRect(x, H - 14, 10, 8);
        ctx.fillStyle = "#fff";
        ctx.fillText(label, x + 13, H - 6);
        x += width + 4;
      });
    } else {
      for (let x = 0; x < 80; x++) {
        const c = colour(x / 79);
        ctx.fillStyle = `rgb(${c[0] | 0},${c[1] | 0},${c[2] | 0})`;
        ctx.fillRect(W - 90 + x, H - 14, 1, 8);
      }
    }
    const shown = groups ? part.n : n;
    // zero-shot gates: the share of the shown word's attention inside its group's region (the rest leaks)
    const leak = (d.leakage || []).find((e) => e.word === d.tokens[this.token]?.word);
    const leakText = leak ? ` · "${leak.word}": ${Math.round(100 * leak.inside)}% of its attention inside its ` +
      `region (${leak.group}), ${Math.round(100 * (1 - leak.inside))}% leaks` : "";
    this.status.textContent = shown ? `${d.summary}${leakText}` : "not recorded at this layer/step";
  }
}

// Keep `value` in the node's properties, which the frontend saves with the graph (and restores on a page reload).
function remember(node, key, value) {
  node.properties = node.properties || {};
  if (JSON.stringify(node.properties[key]) === JSON.stringify(value)) return;
  if (value === undefined) delete node.properties[key];
  else node.properties[key] = value;
  // The current frontend saves the graph when its change tracker sees a change (the 2024 one saves every second).
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

// The newest output of node `id` in the server's history (the 2024 frontend does not re-send a cached node's
// output, and a freshly loaded graph has no properties to restore from).
async function fromHistory(id, classType) {
  try {
    const r = await fetch(api.apiURL("/history?max_items=64"), { cache: "no-store" });
    const history = Object.values(await r.json());
    for (let i = history.length - 1; i >= 0; i--) {
      const out = history[i]?.outputs?.[id];
      const queued = history[i]?.prompt?.[2]?.[id]; // [number, prompt id, prompt, extra, outputs]
      if (out && (!queued || queued.class_type === classType)) return out;
    }
  } catch (e) { /* no history: nothing to restore */ }
  return null;
}

function graphNodes() {
  return Array.from(app.graph?._nodes ?? app.graph?.nodes ?? []);
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
  return viewer;
}

// The zero-shot node's grouping (its `ui` text) and sampling-time notices, shown on the node itself.
function groupingBox(node) {
  if (node.maskattnGrouping) return node.maskattnGrouping;
  const box = el("textarea", "width:100%;height:100%;box-sizing:border-box;resize:none;font:11px monospace;" +
    "color:#ddd;background:#1b1b1f;border:1px solid #444;border-radius:4px;padding:4px;",
    { readOnly: true, placeholder: "The grouping appears here when the node runs." });
  box.className = "maskattn-grouping";
  node.addDOMWidget("maskattn_grouping", "maskattn-grouping", box, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 96, getHeight: () => 120,
  });
  node.maskattnGrouping = box;
  return box;
}

function showGrouping(node, text, notice) {
  const box = groupingBox(node);
  if (notice) {
    remember(node, "maskattn_notice", text);
  } else {
    // a new grouping (the node ran again) clears the last sampling notice; the same one re-sent from ComfyUI's
    // cache keeps it, since the cause is still there
    if (text !== node.properties?.maskattn_grouping) remember(node, "maskattn_notice", undefined);
    remember(node, "maskattn_grouping", text);
  }
  const warning = node.properties.maskattn_notice;
  box.value = (warning ? `WARNING: ${warning}\n\n` : "") + (node.properties.maskattn_grouping || "");
  box.style.borderColor = warning || /NOTHING TO SEPARATE/.test(box.value) ? "#c84" : "#444";
  app.graph?.setDirtyCanvas?.(true, true);
}

async function restore(node, askHistory) {
  const props = node.properties || {};
  if (node.maskattnViewer && !node.maskattnViewer.data) {
    let ref = props[VIEWER_KEY];
    if (!ref && askHistory) ref = (await fromHistory(String(node.id), NODE_CLASS))?.[VIEWER_KEY]?.[0];
    if (ref) node.maskattnViewer.load(ref);
  }
  if (node.maskattnGrouping && !node.maskattnGrouping.value) {
    let text = props.maskattn_grouping;
    if (!text && askHistory) text = (await fromHistory(String(node.id), ZERO_SHOT_CLASS))?.text?.[0];
    if (text) showGrouping(node, text);
  }
}

app.registerExtension({
  name: "MaskAttn.GateViewer",
  setup() {
    // Registered in setup(): the frontend only dispatches custom websocket messages that have a listener.
    api.addEventListener(NOTICE_EVENT, (event) => {
      const { node: id, text } = event.detail || {};
      const node = graphNodes().find((n) => String(n.id) === String(id) && n.maskattnGrouping);
      if (node) showGrouping(node, text, true);
    });
    // The 2024 frontend does not re-send a cached node's output: bring back what its properties remember.
    api.addEventListener("execution_cached", (event) => {
      const ids = new Set((event.detail?.nodes || []).map(String));
      for (const node of graphNodes()) if (ids.has(String(node.id))) restore(node, true);
    });
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_CLASS && nodeData?.name !== ZERO_SHOT_CLASS) return;
    const preview = nodeData.name === NODE_CLASS;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      if (preview) {
        attach(this);
        if (this.size && this.size[1] < 760) this.setSize?.([Math.max(this.size[0], 460), 760]);
      } else {
        groupingBox(this);
      }
      return r;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = executed?.apply(this, arguments);
      if (preview) attach(this).load(output?.[VIEWER_KEY]?.[0]);
      else if (output?.text?.length) showGrouping(this, output.text[0]);
      return r;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      if (viewers.get(String(this.id)) === this.maskattnViewer) viewers.delete(String(this.id));
      return removed?.apply(this, arguments);
    };
  },
  loadedGraphNode(node) {
    // ids are assigned when a saved graph is configured: index the viewer under its final id, then show what the
    // node's properties remember of its last run (a page reload keeps the graph, not the outputs)
    if (node.maskattnViewer) viewers.set(String(node.id), node.maskattnViewer);
    restore(node, false);
  },
});

// For tests and for other extensions: the viewers by node id.
window.MaskAttnViewers = viewers;
