/*
 * Training form: show the chosen rule's hyperparameters, the privacy fields of the chosen option and the
 * rollback fields when enabled; switch between the form and the JSON tab (the hidden "editor" field tells
 * the server which one to validate). Without JavaScript every field is shown and the form still works.
 */
(function () {
  "use strict";

  const form = document.getElementById("training-form");
  if (!form) return;
  const editor = form.querySelector("input[name=editor]");
  const algorithm = form.querySelector("select[name=algorithm]");

  function showHyperparameters() {
    for (const group of form.querySelectorAll(".hyperparameters")) {
      const shown = group.dataset.algorithm === algorithm.value;
      group.hidden = !shown;
      for (const input of group.querySelectorAll("input, select")) input.disabled = !shown;
    }
  }

  function showPrivacy() {
    const checked = form.querySelector("input[name=privacy_choice]:checked");
    const choice = checked ? checked.value : "none";
    for (const block of form.querySelectorAll("[data-privacy]")) {
      block.hidden = !block.dataset.privacy.split(" ").includes(choice);
    }
  }

  function showRollback() {
    const enabled = form.querySelector("input[name=rollback_enabled]").checked;
    document.getElementById("rollback-fields").hidden = !enabled;
  }

  function selectTab(name) {
    editor.value = name;
    for (const tab of form.querySelectorAll("[role=tab]")) {
      const selected = tab.dataset.editor === name;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
    }
    document.getElementById("panel-form").hidden = name !== "form";
    document.getElementById("panel-json").hidden = name !== "json";
  }

  function value(name) {
    const input = form.elements[name];
    if (!input || input.disabled) return undefined;
    if (input.type === "checkbox") return input.checked;
    return input.value === "" ? undefined : input.value;
  }

  function number(name) {
    const text = value(name);
    return text === undefined ? undefined : Number(text);
  }

  /** The same mapping as monitoring/forms.py, for the "Fill from the form fields" button. */
  function configurationFromFields() {
    const config = { name: value("name") || "" };
    for (const key of ["max_rounds", "input_dim", "num_classes", "min_clients_per_round", "max_clients_per_round", "local_epochs", "batch_size", "max_round_attempts", "seed"]) {
      if (number(key) !== undefined) config[key] = number(key);
    }
    for (const key of ["target_accuracy", "learning_rate", "round_timeout_seconds"]) {
      if (number(key) !== undefined) config[key] = number(key);
    }
    for (const key of ["model_type", "algorithm", "selection"]) config[key] = value(key);
    config.evaluation_dataset = value("evaluation_dataset") || null;
    const hidden = (value("hidden_sizes") || "").split(/[\s,]+/).filter(Boolean).map(Number);
    config.hidden_sizes = hidden;
    config.hyperparameters = {};
    for (const input of form.querySelectorAll(`.hyperparameters[data-algorithm="${algorithm.value}"] input, .hyperparameters[data-algorithm="${algorithm.value}"] select`)) {
      if (input.value === "") continue;
      const name = input.name.split("__")[1];
      if (input.type === "number") config.hyperparameters[name] = Number(input.value);
      else {
        try { config.hyperparameters[name] = input.tagName === "SELECT" ? input.value : JSON.parse(input.value); } catch (error) { config.hyperparameters[name] = input.value; }
      }
    }
    const checked = form.querySelector("input[name=privacy_choice]:checked");
    const choice = checked ? checked.value : "none";
    if (choice === "none") config.privacy = null;
    else if (choice === "level") config.privacy = { mode: value("privacy_mode"), level: value("privacy_level") };
    else config.privacy = { mode: value("privacy_mode"), epsilon: number("privacy_epsilon"), delta: number("privacy_delta") };
    if (value("rollback_enabled")) {
      config.rollback = { enabled: true, metric: value("rollback_metric"), performance_threshold: number("rollback_performance_threshold"),
        consecutive_degradations: number("rollback_consecutive_degradations"), max_rollbacks: number("rollback_max_rollbacks"),
        rollback_to_best: value("rollback_rollback_to_best") };
    }
    return config;
  }

  algorithm.addEventListener("change", showHyperparameters);
  for (const radio of form.querySelectorAll("input[name=privacy_choice]")) radio.addEventListener("change", showPrivacy);
  form.querySelector("input[name=rollback_enabled]").addEventListener("change", showRollback);
  const tabs = [...form.querySelectorAll("[role=tab]")];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab.dataset.editor));
    tab.addEventListener("keydown", (event) => {
      if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
      const next = tabs[(tabs.indexOf(tab) + 1) % tabs.length];
      selectTab(next.dataset.editor);
      next.focus();
    });
  }
  document.getElementById("json-from-form").addEventListener("click", () => {
    form.elements.config_json.value = JSON.stringify(configurationFromFields(), null, 2);
  });
  showHyperparameters();
  showPrivacy();
  showRollback();
  selectTab(editor.value || "form");
  const firstError = form.querySelector(".has-error input, .has-error select, .has-error textarea");
  if (firstError && !firstError.closest("[hidden]")) firstError.focus();
})();
