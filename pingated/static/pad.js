/*
 * The PIN pad of pingated: turns the plain form (which works without
 * JavaScript) into dots and a 3x4 keypad.  Keyboard: 0-9, Backspace,
 * Escape (clear), Enter.  The digits live only in a local variable and in
 * the password field's value at the moment the form is posted; the page
 * shows dots, and screen readers hear how many digits were entered.
 * Loaded as an external same-origin script because the gate's CSP forbids
 * inline script.
 */
(function () {
  "use strict";

  var MAX_DIGITS = 64;
  var form = document.getElementById("pin-form");
  var input = document.getElementById("pin");
  var pad = document.getElementById("pad");
  var entry = document.getElementById("entry");
  var dots = document.getElementById("dots");
  var count = document.getElementById("count");
  var prompt = document.getElementById("prompt");
  var gate = document.querySelector(".gate");
  if (!form || !input || !pad || !entry || !dots || !count || !gate) {
    return; // not the PIN page: leave the plain form alone
  }

  var digits = "";
  var submitting = false;
  var promptText = prompt ? prompt.textContent : "";

  function render() {
    while (dots.firstChild) {
      dots.removeChild(dots.firstChild);
    }
    for (var i = 0; i < digits.length; i++) {
      var dot = document.createElement("span");
      dot.className = "dot";
      dots.appendChild(dot);
    }
    dots.setAttribute("data-count", String(digits.length));
    count.textContent = digits.length === 1 ? "1 digit entered"
      : digits.length + " digits entered";
  }

  function shake() {
    gate.classList.remove("shake");
    void gate.offsetWidth; // restart the animation
    gate.classList.add("shake");
  }

  function flash(key) {
    var button = pad.querySelector('[data-key="' + key + '"]');
    if (!button) { return; }
    button.classList.add("pressed");
    window.setTimeout(function () { button.classList.remove("pressed"); }, 120);
  }

  function press(key) {
    if (submitting) { return; }
    if (/^[0-9]$/.test(key)) {
      if (digits.length < MAX_DIGITS) { digits += key; }
    } else if (key === "Backspace") {
      digits = digits.slice(0, -1);
    } else if (key === "Escape") {
      digits = "";
    } else if (key === "Enter") {
      submit();
      return;
    }
    render();
  }

  function submit() {
    if (submitting) { return; }
    if (!digits) {
      shake();
      return;
    }
    submitting = true;
    input.value = digits;
    gate.classList.add("busy");
    pad.setAttribute("aria-busy", "true");
    if (prompt) { prompt.textContent = "Checking\u2026"; }
    form.submit();
  }

  function reset() {
    digits = "";
    submitting = false;
    input.value = "";
    gate.classList.remove("busy");
    pad.removeAttribute("aria-busy");
    if (prompt) { prompt.textContent = promptText; }
    render();
  }

  // Switch from the plain form to the keypad.
  document.documentElement.classList.add("js");
  input.removeAttribute("required");
  input.removeAttribute("autofocus");
  input.blur();
  var plain = document.querySelectorAll(".plain");
  for (var i = 0; i < plain.length; i++) {
    plain[i].hidden = true;
  }
  entry.hidden = false;
  pad.hidden = false;
  render();

  pad.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button[data-key]") : null;
    if (!button || !pad.contains(button)) { return; }
    event.preventDefault();
    press(button.getAttribute("data-key"));
  });

  // A mouse click must not leave focus on the button: a later Enter on the
  // keyboard would press that button again instead of unlocking.
  pad.addEventListener("mousedown", function (event) {
    if (event.target.closest && event.target.closest("button[data-key]")) {
      event.preventDefault();
    }
  });

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) { return; }
    var key = event.key;
    if (key === "Enter" || key === " ") {
      // On a focused keypad button Enter/Space already "click" it.
      var target = event.target;
      if (target && target.tagName === "BUTTON") { return; }
      if (key === " ") { return; }
    }
    if (/^[0-9]$/.test(key) || key === "Backspace" || key === "Escape" || key === "Enter") {
      event.preventDefault();
      flash(key);
      press(key);
    }
  });

  form.addEventListener("submit", function (event) {
    // A native submit (e.g. Enter in a browser's own handling) goes through
    // the same path so the digits are always copied into the field.
    if (!submitting) {
      event.preventDefault();
      submit();
    }
  });

  // Coming back with the browser's back button must not show old digits.
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) { reset(); }
  });
})();
