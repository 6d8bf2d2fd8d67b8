(function () {
  "use strict";
  var root = document.documentElement;
  root.classList.remove("no-js");
  root.classList.add("js");

  // The interactive views reuse the images of the static row, so each image is inlined once.
  document.querySelectorAll("img[data-src-from]").forEach(function (img) {
    var source = document.getElementById(img.getAttribute("data-src-from"));
    if (source) { img.src = source.src; }
  });

  document.querySelectorAll("[data-slider]").forEach(function (box) {
    var range = box.querySelector("input[type=range]");
    var over = box.querySelector(".over");
    var divider = box.querySelector(".divider");
    function update() {
      var value = Number(range.value);
      over.style.clipPath = "inset(0 " + (100 - value) + "% 0 0)";
      divider.style.marginLeft = value + "%";
      range.setAttribute("aria-valuetext", "preview " + value + "% from the left, replay " + (100 - value) + "%");
    }
    range.addEventListener("input", update);
    update();
  });

  // Filters by verdict: a card whose verdict is unticked is hidden (the page shows every card without JS).
  var filters = document.querySelector("[data-filters]");
  var boxes = filters ? filters.querySelectorAll("input[type=checkbox]") : [];
  var cards = document.querySelectorAll("article.card");
  function applyFilters() {
    var shown = {};
    boxes.forEach(function (box) { shown[box.value] = box.checked; });
    var count = 0;
    cards.forEach(function (card) {
      var on = shown[card.getAttribute("data-outcome")] !== false;
      card.hidden = !on;
      if (on) { count += 1; }
    });
    filters.querySelector(".filter-state").textContent = count + " of " + cards.length + " previews shown";
  }
  if (filters) {
    boxes.forEach(function (box) { box.addEventListener("change", applyFilters); });
    applyFilters();
  }

  // A link to a card (overview thumbnail, worst previews) shows it: its verdict ticked, its details open.
  function reveal(id) {
    var card = document.getElementById(id);
    if (!card || !card.matches("article.card")) { return; }
    var outcome = card.getAttribute("data-outcome");
    boxes.forEach(function (box) {
      if (box.value === outcome && !box.checked) { box.checked = true; applyFilters(); }
    });
    var body = card.querySelector("details.body");
    if (body) { body.open = true; }
  }
  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a[href^='#']") : null;
    if (link) { reveal(decodeURIComponent(link.getAttribute("href").slice(1))); }
  });
  window.addEventListener("hashchange", function () { reveal(decodeURIComponent(location.hash.slice(1))); });
  if (location.hash) { reveal(decodeURIComponent(location.hash.slice(1))); }

  document.querySelectorAll("[data-blink]").forEach(function (box) {
    var button = box.querySelector("button");
    var replay = box.querySelector(".blink-replay");
    var state = box.querySelector(".blink-state");
    button.addEventListener("click", function () {
      var showReplay = replay.hidden;
      replay.hidden = !showReplay;
      button.setAttribute("aria-pressed", String(showReplay));
      button.textContent = showReplay ? "Show preview" : "Show replay";
      state.textContent = showReplay ? "Showing: replay" : "Showing: preview";
    });
  });
})();
