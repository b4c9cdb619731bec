// Run selection for the comparison chart: a filterable checkbox list with select all / none,
// and one colour per run (a fixed palette, then golden-angle hue rotation: distinct for 20+ runs).

import {el, printable} from './format.js';

const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd',
  '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
const LIGHTNESS = [42, 55, 34];

/** Colour of the run at `index` in the run list: stable while the list does not change. */
export function runColor(index) {
  if (index < PALETTE.length) return PALETTE[index];
  const hue = Math.round((index * 137.508) % 360);
  return `hsl(${hue}, 70%, ${LIGHTNESS[Math.floor(index / PALETTE.length) % LIGHTNESS.length]}%)`;
}

/** Builds the selector's nodes; `onChange()` is called after the user changes the selection. */
export function buildRunList(onChange) {
  const box = el('div', 'gw-runs');
  box.id = 'gw-runs';
  const bar = el('div', 'gw-runs-bar');
  const filter = el('input', 'gw-run-filter');
  filter.id = 'gw-run-filter';
  filter.type = 'search';
  filter.placeholder = 'Filter runs';
  filter.setAttribute('aria-label', 'Filter runs');
  const all = el('button', 'gw-button gw-small', 'All');
  all.id = 'gw-select-all';
  all.title = 'Select every run shown by the filter';
  const none = el('button', 'gw-button gw-small', 'None');
  none.id = 'gw-select-none';
  none.title = 'Unselect every run shown by the filter';
  const count = el('span', 'gw-caption gw-run-count');
  count.id = 'gw-run-count';
  bar.append(filter, all, none, count);
  const items = el('div', 'gw-run-items');
  items.id = 'gw-run-items';
  box.append(bar, items);
  const list = {box, filter, items, count, names: [], selected: new Set(), known: new Set()};
  const visible = () => list.names.filter((name) => matches(name, filter.value));
  filter.addEventListener('input', () => renderItems(list));
  all.addEventListener('click', () => { for (const name of visible()) list.selected.add(name); renderItems(list); onChange(); });
  none.addEventListener('click', () => { for (const name of visible()) list.selected.delete(name); renderItems(list); onChange(); });
  items.addEventListener('change', (event) => {
    const name = event.target.closest('.gw-run-item').dataset.run;
    if (event.target.checked) list.selected.add(name); else list.selected.delete(name);
    updateCount(list);
    onChange();
  });
  return list;
}

function matches(name, query) {
  return name.toLowerCase().includes(query.trim().toLowerCase());
}

/** Sets the run names; runs not seen before start selected, vanished runs are dropped. */
export function setRuns(list, names) {
  list.names = names;
  for (const name of names) {
    if (!list.known.has(name)) list.selected.add(name);
    list.known.add(name);
  }
  const present = new Set(names);
  for (const name of [...list.selected]) if (!present.has(name)) list.selected.delete(name);
  renderItems(list);
}

/** The selected runs, in list order. */
export function selectedRuns(list) {
  return list.names.filter((name) => list.selected.has(name));
}

export function colorOf(list, name) {
  return runColor(list.names.indexOf(name));
}

function renderItems(list) {
  const shown = list.names.filter((name) => matches(name, list.filter.value));
  list.items.replaceChildren(...shown.map((name) => {
    const item = el('label', 'gw-run-item');
    item.dataset.run = name;
    item.title = printable(name);
    const box = el('input');
    box.type = 'checkbox';
    box.checked = list.selected.has(name);
    const swatch = el('span', 'gw-run-swatch');
    swatch.style.background = colorOf(list, name);
    item.append(box, swatch, el('span', 'gw-run-name', name));
    return item;
  }));
  if (!shown.length) list.items.appendChild(el('span', 'gw-caption', 'No run matches the filter.'));
  updateCount(list);
}

function updateCount(list) {
  const shown = list.names.filter((name) => matches(name, list.filter.value)).length;
  const filtered = shown < list.names.length ? `, ${shown} match the filter` : '';
  list.count.textContent = `${list.selected.size} of ${list.names.length} runs selected${filtered}`;
}
