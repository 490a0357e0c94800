// facepipe dashboard: plain ES2020, no build step. One hash router, one
// render function per view; each view returns a cleanup that stops its
// timers/streams so nothing keeps polling after navigation.
'use strict';

// ---------- state ----------

const session = { tokenRequired: false, signedIn: false, csrf: null };
let cleanupView = null;            // cleanup returned by the current view
let batchFilters = { project: '', status: '' }; // survives navigation, like a tab would

const $ = (id) => document.getElementById(id);

// ---------- DOM helpers (all API text goes through textContent) ----------

const PROPS = new Set(['value', 'disabled', 'selected', 'checked', 'hidden', 'required']);

function el(tag, props = {}, ...kids) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === 'class') n.className = v;
    else if (k === 'text') n.textContent = v;
    else if (k.startsWith('on')) n.addEventListener(k.slice(2), v);
    else if (PROPS.has(k)) n[k] = v;
    else n.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of kids.flat()) if (c != null && c !== false) n.append(c);
  return n;
}

// API-provided URLs must be same-origin paths or http(s), never javascript:.
function safeUrl(u) {
  if (typeof u !== 'string') return '';
  return (u.startsWith('/') && !u.startsWith('//')) || /^https?:\/\//i.test(u) ? u : '';
}

const enc = encodeURIComponent;
const batchHref = (id) => `#/batch/${enc(id)}`;
const imageHref = (bid, iid) => `#/batch/${enc(bid)}/image/${enc(iid)}`;

function badge(status, id) {
  return el('span', { class: `badge status-${status}`, id, text: status ?? '–' });
}

function table(id, headers, numeric = []) {
  const tbody = el('tbody');
  const t = el('table', { id },
    el('thead', {}, el('tr', {}, headers.map((h, i) =>
      el('th', { scope: 'col', class: numeric.includes(i) ? 'num' : null, text: h })))),
    tbody);
  return { wrap: el('div', { class: 'table-wrap' }, t), tbody };
}

const td = (content, cls) => el('td', { class: cls }, content ?? '–');

function field(label, control, hint) {
  return el('div', { class: 'field' },
    el('label', { for: control.id, text: label }), control,
    hint ? el('small', { class: 'hint', text: hint }) : null);
}

function prioritySelect(id) {
  const s = el('select', { id, name: 'priority' });
  for (let p = 1; p <= 10; p++) s.append(el('option', { value: String(p), text: String(p) }));
  s.value = '5';
  return s;
}

// Filter options; the empty value means "all".
const options = (values) => values.map((v) => el('option', { value: v, text: v || 'all' }));

// A <dl> from [label, value] pairs; null pairs are skipped.
const metaList = (pairs) => el('dl', { class: 'meta' }, pairs.filter(Boolean).flatMap(([k, v]) =>
  [el('dt', { text: k }), el('dd', {}, v ?? '–')]));

function loadFailed(container, err) {
  container.replaceChildren(el('p', { class: 'error', text: `could not load: ${err.message}` }));
}

// ---------- formatting ----------

const fmtTime = (s) => (s ? new Date(s).toLocaleString() : '–');
const fmtRate = (r) => (typeof r === 'number' ? r.toFixed(1) : '–');
const fmtPct = (p) => (typeof p === 'number' ? `${Math.round(p)}%` : '–');
const isFinal = (status) => status === 'completed' || status === 'failed';

function fmtEta(sec) {
  if (typeof sec !== 'number' || !isFinite(sec) || sec < 0) return '–';
  if (sec < 60) return `${Math.round(sec)} s`;
  if (sec < 3600) return `${Math.round(sec / 60)} min`;
  const h = Math.floor(sec / 3600), m = Math.round((sec % 3600) / 60);
  return m ? `${h} h ${m} min` : `${h} h`;
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}

// ---------- messages ----------

function showMessage(text, kind = 'error') {
  const box = $('messages');
  // Polling views can fail every few seconds: don't stack identical errors.
  for (const m of box.children) {
    if (m.classList.contains(kind) && m.firstChild.textContent === text) return;
  }
  const msg = el('div', { class: `message ${kind}` }, el('span', { text }),
    el('button', { type: 'button', class: 'dismiss', 'aria-label': 'Dismiss', text: '×',
      onclick: () => msg.remove() }));
  box.append(msg);
  while (box.children.length > 5) box.firstChild.remove();
  if (kind === 'ok') {
    setTimeout(() => msg.classList.add('fading'), 6000);
    setTimeout(() => msg.remove(), 6600);
  }
}

// ---------- API ----------

// Errors carry the HTTP status (0 = network) so callers can tell 401s apart.
const apiError = (message, status) => Object.assign(new Error(message), { status });

// fetch + JSON + visible error + 401 -> sign-in. `notFound` replaces the
// message for a 404 (e.g. "no batch X").
async function api(path, { method = 'GET', body, notFound } = {}) {
  const headers = { Accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  if (method !== 'GET' && session.csrf) headers['X-CSRF-Token'] = session.csrf;
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    const msg = `network error (${method} ${path}): ${e.message}`;
    showMessage(msg);
    throw apiError(msg, 0);
  }
  let data = null;
  try { data = await res.json(); } catch { /* empty or non-JSON body */ }
  const bodyError = data && typeof data.error === 'string' && data.error ? data.error : null;
  if (res.status === 401) {
    signedOut(bodyError || 'Please sign in again.');
    throw apiError(bodyError || 'not signed in', 401);
  }
  if (!res.ok || !data || data.success === false) {
    let msg = bodyError || `${method} ${path}: HTTP ${res.status} ${res.statusText}`.trim();
    if (res.status === 404 && notFound) msg = notFound;
    if (res.ok && !data && method !== 'GET') return {}; // e.g. an empty 204 from /ui/logout
    if (res.ok && !data) msg = `${method} ${path}: the answer was not JSON`;
    showMessage(msg);
    throw apiError(msg, res.status);
  }
  return data;
}

// ---------- session ----------

function updateHeader() {
  $('logout').hidden = !(session.tokenRequired && session.signedIn);
}

const needsLogin = () => session.tokenRequired && !session.signedIn;

// Any 401: forget the session and ask for the token again.
function signedOut(reason) {
  session.signedIn = false;
  session.tokenRequired = true;
  session.csrf = null;
  updateHeader();
  if (reason) showMessage(reason);
  renderLogin();
}

function renderLogin() {
  if (cleanupView) { cleanupView(); cleanupView = null; }
  if ($('login-form')) return;   // keep what the user is typing
  document.title = 'Sign in · facepipe';
  const token = el('input', { id: 'login-token', type: 'password', name: 'token',
    autocomplete: 'current-password', required: true });
  const error = el('p', { id: 'login-error', class: 'error' });
  const submit = el('button', { id: 'login-submit', type: 'submit', class: 'primary', text: 'Sign in' });
  const form = el('form', { id: 'login-form', class: 'card narrow' },
    el('h1', { text: 'Sign in' }),
    el('p', { text: 'This facepipe server needs its access token.' }),
    field('Token', token), error, el('div', { class: 'actions' }, submit));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    error.textContent = '';
    try {
      const res = await fetch('/ui/login', {
        method: 'POST', credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify({ token: token.value }),
      });
      let data = null;
      try { data = await res.json(); } catch { /* ignore */ }
      if (!res.ok) {
        error.textContent = (data && data.error) || `Sign-in failed (HTTP ${res.status})`;
        return;
      }
      session.csrf = (data && data.csrf) || null;
      session.signedIn = true;
      $('messages').replaceChildren(); // the "please sign in" errors are stale now
      updateHeader();
      route();
    } catch (e) {
      error.textContent = `Network error: ${e.message}`;
    } finally {
      submit.disabled = false;
    }
  });
  $('view').replaceChildren(form);
  token.focus();
}

async function logout() {
  try {
    await api('/ui/logout', { method: 'POST' });
  } catch { return; } // already shown (and a 401 already shows the sign-in form)
  session.signedIn = false;
  session.csrf = null;
  updateHeader();
  renderLogin();
}

// Resolves true only when the user picks #confirm-yes (form method=dialog sets returnValue).
function confirmDialog(text) {
  const dlg = $('confirm');
  if (dlg.open) return Promise.resolve(false);
  $('confirm-text').textContent = text;
  dlg.returnValue = '';
  return new Promise((resolve) => {
    dlg.addEventListener('close', () => resolve(dlg.returnValue === 'yes'), { once: true });
    dlg.showModal();
  });
}

// ---------- router ----------

function parseHash() {
  const raw = location.hash.replace(/^#/, '');
  const [path, query = ''] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map((p) => {
    try { return decodeURIComponent(p); } catch { return p; }
  });
  return { parts, query: new URLSearchParams(query) };
}

function route() {
  if (cleanupView) { cleanupView(); cleanupView = null; }
  // Errors belong to the page that raised them; notices (a replay, an upload) may outlive it.
  for (const m of [...$('messages').children]) if (m.classList.contains('error')) m.remove();
  if (needsLogin()) { renderLogin(); return; }
  const { parts, query } = parseHash();
  const root = $('view');
  root.replaceChildren();
  let section = parts[0] || 'batches';
  let cleanup;
  if (parts.length === 0 || (section === 'batches' && parts.length === 1)) cleanup = renderBatches(root);
  else if (section === 'batch' && parts.length === 2) cleanup = renderBatch(root, parts[1]);
  else if (section === 'batch' && parts.length === 4 && parts[2] === 'image') cleanup = renderImage(root, parts[1], parts[3]);
  else if (section === 'upload') cleanup = renderUpload(root);
  else if (section === 'queues') cleanup = renderQueues(root);
  else if (section === 'dead-letters') cleanup = renderDeadLetters(root, query);
  else {
    document.title = 'Not found · facepipe';
    root.append(el('h1', { text: 'Not found' }),
      el('p', {}, 'No such page. ', el('a', { href: '#/batches', text: 'Back to the batches' })));
  }
  cleanupView = typeof cleanup === 'function' ? cleanup : null;
  if (section === 'batch') section = 'batches';
  for (const a of document.querySelectorAll('header nav a')) {
    if (a.getAttribute('href') === `#/${section}`) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

// ---------- batches list ----------

function batchRow(b) {
  const pct = typeof b.progressPercent === 'number' ? Math.max(0, Math.min(100, b.progressPercent)) : 0;
  const bar = el('div', { class: 'bar', 'aria-hidden': 'true' }, el('div', { class: 'bar-fill' }));
  bar.firstChild.style.width = `${pct}%`;
  const p = b.progress || {};
  return el('tr', { 'data-batch-id': b.batchId },
    td(el('a', { href: batchHref(b.batchId), class: 'mono', text: b.batchId })),
    td(b.projectId),
    td(b.stalledSince && !isFinal(b.status) ? el('span', {}, badge(b.status), ' ', badge('stalled')) : badge(b.status)),
    td(el('span', { class: 'progress-cell' }, bar, fmtPct(b.progressPercent))),
    td(fmtRate(b.imagesPerSecond), 'num'),
    td(isFinal(b.status) ? '–' : fmtEta(b.etaSeconds), 'num'),
    td(String(b.facesFound ?? '–'), 'num'),
    td(String(p.failed ?? '–'), 'num'),
    el('td', { class: 'nowrap', title: b.createdAt || '', text: fmtTime(b.createdAt) }));
}

function renderBatches(root) {
  document.title = 'Batches · facepipe';
  let alive = true, gen = 0, pages = 0, nextBefore = null, busy = false;

  const project = el('input', { id: 'filter-project', type: 'search', value: batchFilters.project, placeholder: 'any project' });
  const status = el('select', { id: 'filter-status' },
    options(['', 'ingesting', 'processing', 'completed', 'failed']));
  status.value = batchFilters.status;
  const filters = el('form', { class: 'filters' },
    field('Project', project), field('Status', status),
    el('button', { type: 'submit', text: 'Apply' }));
  const { wrap, tbody } = table('batches',
    ['Batch', 'Project', 'Status', 'Progress', 'Images/s', 'ETA', 'Faces', 'Failures', 'Created'], [4, 5, 6, 7]);
  const panel = el('div', {}, el('p', { class: 'muted', text: 'Loading…' }));
  const more = el('button', { id: 'batches-more', type: 'button', text: 'More', hidden: true });
  root.append(el('h1', { text: 'Batches' }), filters, panel, more);

  // first=true replaces the table (filters/refresh); otherwise appends the next page.
  async function load(first) {
    const my = first ? ++gen : gen;
    busy = true;
    const q = new URLSearchParams({ limit: '25' });
    if (batchFilters.project) q.set('project', batchFilters.project);
    if (batchFilters.status) q.set('status', batchFilters.status);
    if (!first && nextBefore) q.set('before', nextBefore);
    try {
      const data = await api(`/api/batches?${q}`);
      if (!alive || my !== gen) return;
      const rows = (data.batches || []).map(batchRow);
      if (first) { tbody.replaceChildren(...rows); pages = 1; } else { tbody.append(...rows); pages++; }
      nextBefore = data.nextBefore ?? null;
      more.hidden = !nextBefore;
      if (tbody.children.length) panel.replaceChildren(wrap);
      else if (batchFilters.project || batchFilters.status) panel.replaceChildren(el('p', { class: 'empty', text: 'No batches match these filters.' }));
      else panel.replaceChildren(el('p', { class: 'empty' }, 'No batches yet — ', el('a', { href: '#/upload', text: 'upload one' })));
    } catch (e) {
      if (alive && my === gen && first && !tbody.children.length) loadFailed(panel, e);
    } finally {
      busy = false;
    }
  }

  const apply = (ev) => {
    ev?.preventDefault();
    batchFilters = { project: project.value.trim(), status: status.value };
    load(true);
  };
  filters.addEventListener('submit', apply);
  project.addEventListener('change', apply);
  status.addEventListener('change', apply);
  more.addEventListener('click', () => load(false));

  load(true);
  // Auto-refresh only the newest page; refreshing would drop pages the user loaded.
  const timer = setInterval(() => { if (pages <= 1 && !busy) load(true); }, 5000);
  return () => { alive = false; clearInterval(timer); };
}

// ---------- one batch ----------

function renderBatch(root, batchId) {
  document.title = `Batch ${batchId} · facepipe`;
  let alive = true, es = null, lastRefresh = 0, lastFailed = null;
  let sample = null;        // first progress sample seen while running, for a client-side rate
  let cursor = null, prevCursors = [];
  const prog = (b) => b.progress || {};

  const status = badge('…', 'batch-status');
  const progress = el('progress', { id: 'batch-progress', max: '100' });
  const progressText = el('p', { id: 'batch-progress-text', text: 'Loading…' });
  const meta = el('div');
  const errorLine = el('p', { class: 'error', hidden: true });
  const stalledLine = el('p', { id: 'batch-stalled', class: 'warning', hidden: true });
  const failuresBody = el('div', {}, el('p', { class: 'muted', text: 'Loading…' }));
  const resultsStatus = el('select', { id: 'results-status' },
    options(['', 'cropped', 'no_face', 'failed', 'pending']));
  const { wrap, tbody } = table('results', ['Entry', 'Status', 'Faces', 'Crops', 'Error'], [2]);
  const resultsPanel = el('div', {}, el('p', { class: 'muted', text: 'Loading…' }));
  const prev = el('button', { id: 'results-prev', type: 'button', text: '← Previous', disabled: true });
  const next = el('button', { id: 'results-next', type: 'button', text: 'Next →', disabled: true });
  const pageInfo = el('span', { class: 'muted' });

  root.append(
    el('p', { class: 'crumbs' }, el('a', { href: '#/batches', text: '← Batches' })),
    el('h1', {}, 'Batch ', el('span', { class: 'mono', text: batchId }), ' ', status),
    meta, progress, progressText, stalledLine, errorLine,
    el('p', { class: 'downloads' },
      el('a', { id: 'download-jsonl', class: 'button', href: `/api/batch/${enc(batchId)}/export?format=jsonl`, download: true, text: 'Download JSONL' }),
      el('a', { id: 'download-csv', class: 'button', href: `/api/batch/${enc(batchId)}/export?format=csv`, download: true, text: 'Download CSV' })),
    el('section', { id: 'failures' }, el('h2', { text: 'Failures' }), failuresBody),
    el('section', { class: 'results' },
      el('h2', { text: 'Results' }),
      el('div', { class: 'filters' }, field('Show', resultsStatus)),
      resultsPanel,
      el('div', { class: 'pager' }, prev, pageInfo, next)));

  function update(b) {
    const p = b.progress || {};
    status.className = `badge status-${b.status}`;
    status.textContent = b.status;
    meta.replaceChildren(metaList([['Project', b.projectId], ['Priority', String(b.priority ?? '–')],
      ['Created', fmtTime(b.createdAt)], ['Completed', fmtTime(b.completedAt)]]));
    // Unknown total (still ingesting) -> indeterminate bar.
    if (p.total == null && !isFinal(b.status)) progress.removeAttribute('value');
    else progress.value = b.progressPercent ?? (isFinal(b.status) ? 100 : 0);

    // The stream has no rate; estimate it from what we observed since opening the page.
    let rate = b.imagesPerSecond ?? null, eta = b.etaSeconds ?? null;
    const now = Date.now(), done = p.processed ?? 0;
    if (!isFinal(b.status)) {
      if (!sample) sample = { t: now, n: done };
      if (rate == null && now - sample.t >= 2000 && done > sample.n) rate = (done - sample.n) / ((now - sample.t) / 1000);
      if (eta == null && rate && p.total != null) eta = Math.max(0, p.total - done) / rate;
    }
    const parts = [`${done} / ${p.total ?? '?'} images (${fmtPct(b.progressPercent)})`,
      `${p.failed ?? 0} failed`, `${b.facesFound ?? 0} faces`];
    if (b.skipped) parts.push(`${b.skipped} skipped`);
    if (b.redriven) parts.push(`${b.redriven} re-driven`);
    if (!isFinal(b.status) && rate != null) parts.push(`${rate.toFixed(1)} images/s`);
    if (!isFinal(b.status) && eta != null) parts.push(`ETA ${fmtEta(eta)}`);
    progressText.textContent = parts.join(' · ');
    errorLine.hidden = !b.error;
    errorLine.textContent = b.error ? `Error: ${b.error}` : '';
    stalledLine.hidden = !b.stalledSince || isFinal(b.status);
    stalledLine.textContent = b.stalledSince
      ? `Stalled since ${fmtTime(b.stalledSince)}: images are pending and nothing of this batch is left in any stream ` +
        '(the broker lost their messages). The reconciler publishes them again once it stays so.'
      : '';
  }

  async function loadFailures() {
    try {
      const data = await api(`/api/batch/${enc(batchId)}/failures`);
      if (!alive) return;
      const groups = data.groups || [];
      if (!groups.length) { failuresBody.replaceChildren(el('p', { class: 'empty', text: 'No failures' })); return; }
      failuresBody.replaceChildren(...groups.map((g) => el('div', { class: 'failure-group', 'data-stage': g.stage },
        el('span', { class: 'stage', text: g.stage }),
        el('span', { class: 'reason', text: g.reason }),
        el('span', { class: 'count', text: String(g.count) }),
        g.example ? el('a', { href: imageHref(batchId, g.example), text: `example: ${g.example}` }) : null)));
    } catch (e) {
      if (alive) loadFailed(failuresBody, e);
    }
  }

  function resultRow(img) {
    const crops = (img.crops || []).filter((c) => safeUrl(c.url));
    const thumbs = crops.slice(0, 4).map((c, i) =>
      el('img', { class: 'thumb', loading: 'lazy', src: safeUrl(c.url), alt: `face ${i + 1} of ${img.entry}` }));
    if (crops.length > 4) thumbs.push(el('span', { class: 'muted', text: ` +${crops.length - 4}` }));
    const err = img.status === 'failed' || img.error
      ? `${img.failedStage ? `${img.failedStage}: ` : ''}${img.error ?? 'failed'}` : '';
    return el('tr', { 'data-image-id': img.imageId },
      td(el('a', { class: 'image-link', href: imageHref(batchId, img.imageId), text: img.entry || img.imageId })),
      td(badge(img.status)),
      td(String((img.faces || []).length), 'num'),
      td(thumbs.length ? el('span', { class: 'thumbs' }, thumbs) : '–'),
      td(err || '', err ? 'error' : null));
  }

  let resultsGen = 0;
  async function loadResults() {
    const my = ++resultsGen;
    lastRefresh = Date.now();
    const q = new URLSearchParams({ pageSize: '20' });
    if (resultsStatus.value) q.set('status', resultsStatus.value);
    if (cursor) q.set('after', cursor);
    try {
      const data = await api(`/api/batch/${enc(batchId)}/results?${q}`);
      if (!alive || my !== resultsGen) return;
      const rows = (data.results || []).map(resultRow);
      tbody.replaceChildren(...rows);
      resultsPanel.replaceChildren(rows.length ? wrap : el('p', { class: 'empty', text: 'No images here.' }));
      next.disabled = !data.nextAfter;
      next.dataset.after = data.nextAfter ?? '';
      prev.disabled = !prevCursors.length;
      pageInfo.textContent = `Page ${prevCursors.length + 1}${data.total != null ? ` · ${data.total} images` : ''}`;
    } catch (e) {
      if (alive && my === resultsGen) loadFailed(resultsPanel, e);
    }
  }

  resultsStatus.addEventListener('change', () => { cursor = null; prevCursors = []; loadResults(); });
  next.addEventListener('click', () => { prevCursors.push(cursor); cursor = next.dataset.after || null; loadResults(); });
  prev.addEventListener('click', () => { cursor = prevCursors.pop() ?? null; loadResults(); });

  function openStream() {
    es = new EventSource(`/api/batch/${enc(batchId)}/events`);
    es.addEventListener('status', (ev) => {
      let b;
      try { b = JSON.parse(ev.data); } catch { return; }
      update(b);
      if (isFinal(b.status)) {
        // The server closes after the final event; closing here stops the auto-reconnect.
        es.close(); es = null;
        loadResults(); loadFailures();
        return;
      }
      if (Date.now() - lastRefresh >= 3000) {
        loadResults();
        if (prog(b).failed !== lastFailed) { lastFailed = prog(b).failed; loadFailures(); }
      }
    });
    es.addEventListener('error', (ev) => {
      if (ev.data) { showMessage(String(ev.data)); return; } // server-sent "error" event
      // Connection failure: if the browser gave up, ask the API why (shows 401/404 properly).
      if (es && es.readyState === EventSource.CLOSED) {
        es = null;
        api(`/api/batch/status/${enc(batchId)}`, { notFound: `no batch ${batchId}` })
          .then((d) => { if (alive) update(d.batch); })
          .catch(() => {});
      }
    });
  }
  (async () => {
    try {
      const data = await api(`/api/batch/status/${enc(batchId)}`, { notFound: `no batch ${batchId}` });
      if (!alive) return;
      update(data.batch);
      lastFailed = prog(data.batch).failed;
      loadFailures();
      loadResults();
      if (!isFinal(data.batch.status)) openStream();
    } catch (e) {
      if (!alive) return;
      progressText.textContent = `could not load: ${e.message}`;
      progressText.className = 'error';
      failuresBody.replaceChildren();
      resultsPanel.replaceChildren();
    }
  })();

  return () => { alive = false; if (es) { es.close(); es = null; } };
}

// ---------- one image ----------

function renderImage(root, batchId, imageId) {
  document.title = `Image ${imageId} · facepipe`;
  let alive = true;
  const body = el('div', {}, el('p', { class: 'muted', text: 'Loading…' }));
  root.append(
    el('p', { class: 'crumbs' }, el('a', { href: batchHref(batchId), text: `← Batch ${batchId}` })),
    el('h1', {}, 'Image ', el('span', { class: 'mono', text: imageId })),
    body);

  (async () => {
    try {
      const data = await api(`/api/batch/${enc(batchId)}/images/${enc(imageId)}`,
        { notFound: `no image ${imageId} in batch ${batchId}` });
      if (!alive) return;
      const img = data.image || {};
      const faces = img.faces || [];
      const frame = el('div', { class: 'image-frame' },
        el('img', { id: 'original', src: safeUrl(data.originalUrl), alt: img.entry || imageId }));
      // Boxes in percent of the original size, so they track any display size.
      if (img.width && img.height) {
        faces.forEach((f, i) => {
          const box = el('div', { class: 'box', title: `face ${i + 1}: score ${f.score}` },
            el('span', { class: 'score', text: typeof f.score === 'number' ? f.score.toFixed(2) : '?' }));
          Object.assign(box.style, {
            left: `${(f.x / img.width) * 100}%`, top: `${(f.y / img.height) * 100}%`,
            width: `${(f.w / img.width) * 100}%`, height: `${(f.h / img.height) * 100}%`,
          });
          frame.append(box);
        });
      }
      const view = el('div', { id: 'image-view' }, frame);
      if (!img.width || !img.height) {
        view.append(el('p', { class: 'error', text: img.error ? `Not decoded: ${img.error}` : 'The image has no known size; no face boxes to show.' }));
      }
      const details = metaList([
        ['Entry', img.entry], ['Status', badge(img.status)],
        ['Size', img.width && img.height ? `${img.width} × ${img.height}` : null],
        ['Faces', String(faces.length)], ['Detector', img.detector],
        ['Attempts', img.attempts != null ? String(img.attempts) : null],
        img.recordId && ['Record', img.recordId],
        img.error && ['Error', `${img.failedStage ? `${img.failedStage}: ` : ''}${img.error}`]]);
      const crops = el('div', { id: 'image-crops' }, (img.crops || []).filter((c) => safeUrl(c.url)).map((c, i) =>
        el('a', { href: safeUrl(c.url) }, el('img', { src: safeUrl(c.url), loading: 'lazy', alt: `face ${i + 1} of ${img.entry}` }))));
      if (!crops.children.length) crops.append(el('p', { class: 'muted', text: 'No crops.' }));
      body.replaceChildren(view, details, el('h2', { text: 'Crops' }), crops);
    } catch (e) {
      if (alive) loadFailed(body, e);
    }
  })();
  return () => { alive = false; };
}

// ---------- upload ----------

function renderUpload(root) {
  document.title = 'Upload · facepipe';
  let alive = true;

  const file = el('input', { type: 'file', id: 'upload-file', name: 'file', accept: '.zip,application/zip', required: true });
  const project = el('input', { id: 'upload-project', name: 'projectId', required: true, autocomplete: 'off' });
  const priority = prioritySelect('upload-priority');
  const submit = el('button', { id: 'upload-submit', type: 'submit', class: 'primary', text: 'Upload' });
  const bar = el('progress', { id: 'upload-progress', max: '100', value: 0 });
  const barText = el('span', { id: 'upload-progress-text', class: 'muted' });
  const zipForm = el('form', { id: 'upload-form', class: 'card' },
    el('h2', { text: 'Upload a ZIP of images' }),
    field('ZIP file', file), field('Project', project),
    field('Priority', priority, 'higher runs first'),
    el('div', { class: 'actions' }, submit), el('div', { class: 'upload-status' }, bar, barText));

  const urls = el('textarea', { id: 'urls-list', name: 'images', rows: '6', required: true, placeholder: 'https://example.org/a.jpg' });
  const urlsProject = el('input', { id: 'urls-project', name: 'projectId', required: true, autocomplete: 'off' });
  const urlsPriority = prioritySelect('urls-priority');
  const urlsSubmit = el('button', { id: 'urls-submit', type: 'submit', class: 'primary', text: 'Add images' });
  const urlsForm = el('form', { id: 'urls-form', class: 'card' },
    el('h2', { text: 'Add images by URL' }),
    field('Image URLs', urls, 'one per line; blank lines are ignored'), field('Project', urlsProject),
    field('Priority', urlsPriority, 'higher runs first'), el('div', { class: 'actions' }, urlsSubmit));

  root.append(el('h1', { text: 'Upload' }), el('div', { class: 'two-col' }, zipForm, urlsForm));

  function started(data) {
    showMessage(data.message || `Batch ${data.batchId} started with ${data.imageCount ?? '?'} images`, 'ok');
    if (alive) location.hash = batchHref(data.batchId);
  }

  zipForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const f = file.files[0];
    if (!f) return;
    // XHR rather than fetch: fetch has no upload progress events.
    const fd = new FormData();
    fd.append('projectId', project.value.trim());   // text fields first: the server streams the file
    fd.append('priority', priority.value);
    fd.append('file', f);
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/api/batch/upload-zip');
    xhr.setRequestHeader('Accept', 'application/json');
    if (session.csrf) xhr.setRequestHeader('X-CSRF-Token', session.csrf);
    const setBusy = (b) => { for (const c of zipForm.elements) c.disabled = b; };
    xhr.upload.onprogress = (e) => {
      const total = e.lengthComputable ? e.total : f.size;
      const pct = total ? Math.round((e.loaded / total) * 100) : 0;
      bar.value = pct;
      barText.textContent = `${pct}% of ${fmtBytes(total)}`;
    };
    xhr.onload = () => {
      setBusy(false);
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { /* non-JSON */ }
      if (xhr.status === 401) { signedOut((data && data.error) || 'Please sign in again.'); return; }
      if (xhr.status >= 200 && xhr.status < 300 && data && data.success !== false) { started(data); return; }
      showMessage((data && data.error) || `Upload failed: HTTP ${xhr.status} ${xhr.statusText}`.trim());
      barText.textContent = 'Upload failed.';
    };
    xhr.onerror = () => {
      setBusy(false);
      showMessage('Upload failed: network error');
      barText.textContent = 'Upload failed.';
    };
    setBusy(true);
    bar.value = 0;
    barText.textContent = `0% of ${fmtBytes(f.size)}`;
    xhr.send(fd);
  });

  urlsForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const images = urls.value.split('\n').map((s) => s.trim()).filter(Boolean).map((imageUrl) => ({ imageUrl }));
    if (!images.length) { showMessage('Add at least one image URL.'); return; }
    urlsSubmit.disabled = true;
    try {
      const data = await api('/api/batch/add-images', {
        method: 'POST',
        body: { projectId: urlsProject.value.trim(), priority: Number(urlsPriority.value), images },
      });
      started(data);
    } catch { /* already shown */ } finally {
      urlsSubmit.disabled = false;
    }
  });

  // An upload in progress keeps going after navigation; only the redirect is skipped.
  return () => { alive = false; };
}

// ---------- queues ----------

// Throughput per interval from cumulative `completed` counts.
function sparkline(history) {
  const pts = (history || []).filter((h) => typeof h.t === 'number').sort((a, b) => a.t - b.t);
  const rates = [];
  for (let i = 1; i < pts.length; i++) {
    const dt = (pts[i].t - pts[i - 1].t) / 1000;
    if (dt > 0) rates.push(Math.max(0, (pts[i].completed - pts[i - 1].completed) / dt)); // counters may reset
  }
  if (rates.length < 2) return document.createTextNode('–');
  const W = 100, H = 24, max = Math.max(...rates) || 1;
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('class', 'spark');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', `throughput, peak ${max.toFixed(1)}/s`);
  const line = document.createElementNS(ns, 'polyline');
  line.setAttribute('points', rates.map((r, i) =>
    `${((i / (rates.length - 1)) * W).toFixed(1)},${(H - 1 - (r / max) * (H - 2)).toFixed(1)}`).join(' '));
  svg.append(line);
  return svg;
}

function queueRow(s) {
  const band = s.waitingByBand || {};
  const reps = s.replicas || [];
  return el('tr', { 'data-stage': s.stage },
    el('th', { scope: 'row', text: s.stage }),
    td([String(s.waiting ?? 0), el('small', { class: 'sub', text: `high ${band.high ?? 0} · normal ${band.normal ?? 0} · low ${band.low ?? 0}` })], 'num'),
    td(String(s.active ?? 0), 'num'),
    td(String(s.retrying ?? 0), 'num'),
    td(String(s.completed ?? 0), 'num'),
    td(String(s.failed ?? 0), 'num'),
    td([String(reps.length), el('small', { class: 'sub list', text:
      reps.map((r) => `${r.host}:${r.pid} (${r.inFlight}/${r.concurrency})`).join(', ') +
      (s.idlePullers != null ? `${reps.length ? ' · ' : ''}${s.idlePullers} idle` : '') })], 'num'),
    td(s.perSecond != null ? `${fmtRate(s.perSecond)}/s` : '–', 'num'),
    td(sparkline(s.history)));
}

function renderQueues(root) {
  document.title = 'Queues · facepipe';
  let alive = true, timer = null;
  const { wrap, tbody } = table('queues',
    ['Stage', 'Waiting', 'Active', 'Retrying', 'Completed', 'Failed', 'Replicas', 'Throughput', 'Trend'], [1, 2, 3, 4, 5, 6, 7]);
  const panel = el('div', {}, el('p', { class: 'muted', text: 'Loading…' }));
  const stamp = el('p', { class: 'muted' });
  root.append(el('h1', { text: 'Queues' }), panel, stamp);

  // setTimeout chain rather than setInterval: a slow answer never overlaps the next poll.
  async function poll() {
    try {
      const data = await api('/api/stats');
      if (!alive) return;
      tbody.replaceChildren(...(data.stages || []).map(queueRow));
      panel.replaceChildren(wrap);
      stamp.textContent = `Updated ${new Date(data.timestamp || Date.now()).toLocaleTimeString()} · refreshes every 2 s`;
    } catch (e) {
      if (!alive) return;
      if (!tbody.children.length) loadFailed(panel, e);
      else stamp.textContent = `could not load: ${e.message}`;
      if (e.status === 401) return;
    }
    if (alive) timer = setTimeout(poll, 2000);
  }
  poll();
  return () => { alive = false; clearTimeout(timer); };
}

// ---------- dead letters ----------

function renderDeadLetters(root, query) {
  document.title = 'Dead letters · facepipe';
  let alive = true, nextAfter = null, gen = 0;
  const filter = { batch: (query.get('batch') || '').trim(), stage: query.get('stage') || '' };

  const batch = el('input', { id: 'dl-batch', type: 'search', value: filter.batch, placeholder: 'any batch' });
  const stage = el('select', { id: 'dl-stage' },
    options(['', 'extract', 'detect', 'crop', 'persist']));
  stage.value = filter.stage;
  const filters = el('form', { class: 'filters' }, field('Batch', batch), field('Stage', stage),
    el('button', { type: 'submit', text: 'Apply' }));
  const replayBatch = el('button', { id: 'replay-batch', type: 'button', text: "Replay this batch's letters", disabled: !filter.batch });
  const replayAll = el('button', { id: 'replay-all', type: 'button', class: 'danger', text: 'Replay all' });
  const { wrap, tbody } = table('dead-letters',
    ['ID', 'Time', 'Stage', 'Batch', 'Image', 'Error', 'Attempts', 'Permanent', ''], [0, 6]);
  const panel = el('div', {}, el('p', { class: 'muted', text: 'Loading…' }));
  const more = el('button', { id: 'dead-letters-more', type: 'button', text: 'More', hidden: true });
  root.append(el('h1', { text: 'Dead letters' }), filters,
    el('div', { class: 'actions' }, replayBatch, replayAll), panel, more);

  // Filters live in the hash so the view can be linked (#/dead-letters?batch=x).
  const apply = (ev) => {
    ev?.preventDefault();
    const q = new URLSearchParams();
    if (batch.value.trim()) q.set('batch', batch.value.trim());
    if (stage.value) q.set('stage', stage.value);
    const target = `#/dead-letters${q.toString() ? `?${q}` : ''}`;
    if (location.hash === target) route(); else location.hash = target;
  };
  filters.addEventListener('submit', apply);
  batch.addEventListener('change', apply);
  stage.addEventListener('change', apply);

  async function replay(body, text) {
    if (!(await confirmDialog(text))) return;
    try {
      const data = await api('/api/dead-letters/replay', { method: 'POST', body });
      showMessage(`Replayed ${data.replayed ?? 0} dead letter(s)`, 'ok');
      if (alive) load(true);
    } catch { /* already shown */ }
  }
  replayBatch.addEventListener('click', () => replay({ batch: filter.batch }, `Replay every dead letter of batch ${filter.batch}?`));
  replayAll.addEventListener('click', () => replay({ all: true }, 'Replay ALL dead letters?'));

  function letterRow(l) {
    const btn = el('button', { type: 'button', class: 'replay-one', text: 'Replay' });
    btn.addEventListener('click', () => replay({ ids: [l.id] },
      `Replay dead letter ${l.id} (${l.stage}${l.batchId ? `, batch ${l.batchId}` : ''})?`));
    return el('tr', { 'data-letter-id': String(l.id) },
      td(String(l.id), 'num'),
      el('td', { class: 'nowrap', title: l.time || '', text: fmtTime(l.time) }),
      td(l.stage),
      td(l.batchId ? el('a', { href: batchHref(l.batchId), class: 'mono', text: l.batchId }) : null),
      td(l.batchId && l.imageId ? el('a', { href: imageHref(l.batchId, l.imageId), text: l.imageId }) : l.imageId),
      td(l.error, 'error wrap'),
      td(String(l.attempts ?? '–'), 'num'),
      td(l.permanent ? 'yes' : 'no'),
      td(btn));
  }

  async function load(first) {
    const my = first ? ++gen : gen;
    const q = new URLSearchParams({ limit: '50' });
    if (filter.batch) q.set('batch', filter.batch);
    if (filter.stage) q.set('stage', filter.stage);
    if (!first && nextAfter != null) q.set('after', String(nextAfter));
    try {
      const data = await api(`/api/dead-letters?${q}`);
      if (!alive || my !== gen) return;
      const rows = (data.letters || []).map(letterRow);
      if (first) tbody.replaceChildren(...rows); else tbody.append(...rows);
      nextAfter = data.nextAfter ?? null;
      more.hidden = nextAfter == null;
      panel.replaceChildren(tbody.children.length ? wrap : el('p', { class: 'empty', text: 'No dead letters' }));
    } catch (e) {
      if (alive && my === gen && first) loadFailed(panel, e);
    }
  }
  more.addEventListener('click', () => load(false));
  load(true);
  return () => { alive = false; };
}

// ---------- start ----------

async function start() {
  $('logout').addEventListener('click', logout);
  try {
    const res = await fetch('/ui/session', { credentials: 'same-origin', headers: { Accept: 'application/json' } });
    const data = await res.json().catch(() => null);
    if (!res.ok || !data) throw new Error((data && data.error) || `HTTP ${res.status}`);
    session.tokenRequired = !!data.tokenRequired;
    session.signedIn = !!data.signedIn;
    session.csrf = data.csrf ?? null;
  } catch (e) {
    // Carry on without a session: if the API needs one, its 401 brings up the sign-in form.
    showMessage(`could not load the session: ${e.message}`);
  }
  updateHeader();
  window.addEventListener('hashchange', route);
  route();
}

start();
