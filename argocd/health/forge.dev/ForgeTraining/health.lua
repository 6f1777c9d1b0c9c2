-- Argo CD health of a ForgeTraining (forge.dev/v1alpha1).
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

local function is_true(status, type_)
  local c = condition(status, type_)
  return c ~= nil and c.status == "True"
end

local function message_of(status, type_, fallback)
  local c = condition(status, type_)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

-- "Running: 42.5% (step 1200 of 3000), ETA 3h12m"
local function progress_message(status)
  local msg = status.phase
  local p = status.progress
  if p == nil then
    return msg
  end
  local parts = {}
  if p.percent ~= nil then
    table.insert(parts, string.format("%.1f%%", p.percent))
  end
  if p.step ~= nil and p.step > 0 then
    if p.totalSteps ~= nil then
      table.insert(parts, string.format("(step %d of %d)", p.step, p.totalSteps))
    else
      table.insert(parts, string.format("(step %d)", p.step))
    end
  end
  if #parts > 0 then
    msg = msg .. ": " .. table.concat(parts, " ")
  end
  if p.eta ~= nil and p.eta ~= "" then
    msg = msg .. ", ETA " .. p.eta
  end
  return msg
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

if is_true(status, "Invalid") then
  hs.status = "Degraded"
  hs.message = message_of(status, "Invalid", "The spec is invalid")
  return hs
end

if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(status, "Failed", "Training failed")
  return hs
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message_of(status, "Succeeded", "Training succeeded")
  return hs
end

if status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message_of(status, "Suspended", "Training is suspended")
  return hs
end

if is_true(status, "Stalled") then
  hs.status = "Degraded"
  hs.message = message_of(status, "Stalled", "Training made no progress")
  return hs
end

-- Workers held up (PodsReady False). An image that cannot be pulled, or a queue with no Kueue to
-- admit from it, needs a fix (Degraded, as Argo CD rates such a pod); a worker the scheduler cannot
-- place yet may be placed later (GPUs freed, a node added, the claim created or bound), and a missing
-- or inactive LocalQueue may be created later, like a Pending pod (Progressing). Either way the
-- message says why.
local waits = { Unschedulable = true, PVCNotFound = true, PVCNotBound = true, LocalQueueNotFound = true,
  LocalQueueInactive = true }
local pods = condition(status, "PodsReady")
if pods ~= nil and pods.status == "False" and pods.message ~= nil and pods.message ~= "" then
  if pods.reason == "ImagePullFailed" or pods.reason == "KueueNotInstalled" then
    hs.status = "Degraded"
    hs.message = pods.message
    return hs
  end
  if waits[pods.reason] then
    hs.status = "Progressing"
    hs.message = pods.message
    return hs
  end
end

-- Pending, Queued, Initializing, Running, Restarting, and any phase a newer operator adds
hs.status = "Progressing"
hs.message = progress_message(status)
if status.phase == "Restarting" or status.phase == "Queued" then
  hs.message = message_of(status, status.phase, hs.message)
end
return hs
