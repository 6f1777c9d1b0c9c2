-- Argo CD health of a ForgeEval (forge.dev/v1alpha1).
-- Argo CD passes the live object as `obj`; the script returns hs = {status, message}.
-- Runs on Argo CD's gopher-lua (Lua 5.1) without the os/io libraries.
local hs = {}

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local status = obj.status
local generation = obj.metadata.generation

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end

if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = string.format("Waiting for the operator to observe generation %d (it has seen %d)",
    generation, status.observedGeneration)
  return hs
end

local gate = condition(status, "GatesPassed")

if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(condition(status, "Failed"), "Evaluation failed")
  return hs
end

if gate ~= nil and gate.status == "False" then
  hs.status = "Degraded"
  hs.message = message_of(gate, "A gate did not pass")
  return hs
end

if status.phase == "Succeeded" then
  if gate ~= nil and gate.status == "True" then
    hs.status = "Healthy"
    hs.message = message_of(gate, "Every gate passed")
    if status.mainMetric ~= nil and status.mainMetric ~= "" then
      hs.message = hs.message .. " (" .. status.mainMetric .. ")"
    end
    return hs
  end
  if obj.spec == nil or obj.spec.gates == nil or #obj.spec.gates == 0 then
    hs.status = "Healthy"
    hs.message = "Evaluation succeeded (no gates)"
    return hs
  end
  hs.status = "Progressing"
  hs.message = "Evaluation finished; waiting for the gate result"
  return hs
end

hs.status = "Progressing"
hs.message = "Evaluation " .. status.phase
if status.phase == "Running" then
  hs.message = message_of(condition(status, "Running"), hs.message)
end
return hs
