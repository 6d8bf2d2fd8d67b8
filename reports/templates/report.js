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
