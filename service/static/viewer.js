// The job page's slice viewer: CT, absorbed dose and VOI labels (NIfTI on the dose grid, from
// GET /v1/jobs/{id}/viewer) in NiiVue (vendored: /static/vendor/niivue/).  Sets #viewer-status
// data-state to "ready" (with the volumes shown) or "error" (with the reason) for people and tests;
// the NiiVue instance is window.voxeldoseViewer once ready (volumes: ct, dose, vois in that order).
"use strict";
(function () {
  const box = document.getElementById("viewer");
  const status = document.getElementById("viewer-status");
  if (!box || !status) return;
  function done(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }
  if (typeof niivue === "undefined" || !window.WebGL2RenderingContext) {
    done("error", "The slice viewer needs WebGL2, which this browser does not offer.");
    return;
  }
  async function start() {
    const res = await fetch(box.dataset.manifest, { credentials: "same-origin" });
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(detail);
    }
    const m = await res.json();
    const nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1],
      crosshairColor: [0.2, 0.8, 1, 1],
      isColorbar: true,
      show3Dcrosshair: false,
    });
    await nv.attachToCanvas(document.getElementById("viewer-canvas"));
    const vols = [];
    if (m.volumes.ct) vols.push({ url: m.volumes.ct.url, colormap: "gray", cal_min: -160, cal_max: 240, name: "ct.nii.gz" });
    const dmax = m.dose_max_gy > 0 ? m.dose_max_gy : 1;
    vols.push({ url: m.volumes.dose.url, colormap: "warm", cal_min: 0.05 * dmax, cal_max: dmax, opacity: 0.6, name: "dose.nii.gz" });
    if (m.volumes.vois) vols.push({ url: m.volumes.vois.url, colormap: "random", opacity: 0.3, name: "vois.nii.gz" });
    await nv.loadVolumes(vols);
    if (m.volumes.ct) nv.volumes[0].colorbarVisible = false;
    if (m.volumes.vois) nv.volumes[nv.volumes.length - 1].colorbarVisible = false;
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.updateGLVolume();
    const list = document.getElementById("viewer-labels");
    for (const [value, name] of Object.entries(m.labels)) {
      const li = document.createElement("li");
      li.textContent = value + ": " + name;
      list.appendChild(li);
    }
    window.voxeldoseViewer = nv;
    done("ready", "Dose 0–" + dmax.toFixed(2) + " Gy (colour from 5 % of the maximum). Volumes: " + Object.keys(m.volumes).join(", ") + ".");
  }
  start().catch(function (e) { done("error", "The slice viewer could not load the volumes: " + e.message); });
})();
