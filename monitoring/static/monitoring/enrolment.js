/*
 * Enrolment page: copy the one-time token or key to the clipboard (navigator.clipboard; where the
 * browser refuses, the text is selected so Ctrl+C copies it) and say which happened.
 */
(function () {
  "use strict";

  const button = document.getElementById("copy-secret");
  if (!button) return;
  const input = document.getElementById(button.dataset.copyTarget);
  const state = document.getElementById("copy-state");

  input.addEventListener("focus", () => input.select());
  button.addEventListener("click", async () => {
    input.select();
    try {
      await navigator.clipboard.writeText(input.value);
      state.textContent = "Copied to the clipboard.";
    } catch (error) {
      state.textContent = "The browser did not allow copying: the text is selected, press Ctrl+C (⌘C).";
    }
  });
})();
