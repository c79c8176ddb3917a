-- Orthanc's auto-routing to dicom-node. deploy/compose.yaml mounts this file (Orthanc's
-- LuaScripts, deploy/orthanc/orthanc.json); tests/integration/test_orthanc_routing.py
-- runs this same file in Debian's Orthanc against a real node.
--
-- Each instance Orthanc stores that may be a chest radiograph goes on to the node by
-- C-STORE: Modality CR or DX, and Body Part Examined absent or naming the chest. That is
-- the node's default intake rule (IntakeRules in dicom_node/config.py), loosely: the
-- node decides for good (SOP Class, view, descriptions) and records what it passes
-- over, so sending too much costs an ignored instance, too little a missed study.
--
-- Never routed back: whatever the node itself sent (its SRs and evidence images, by the
-- calling AE title), so no result can loop, whatever a site adds to the rules below.

-- The node's entry in DicomModalities (deploy/orthanc/orthanc.json).
local NODE = 'dicom-node'
-- The AE title the node sends its results with (delivery_calling_ae in the node's
-- config, deploy/node/node.toml).
local NODE_CALLING_AE = 'DICOM_NODE'
-- Modality (0008,0060) values routed (the node's intake.modalities).
local MODALITIES = { CR = true, DX = true }
-- Body Part Examined (0018,0015) values that contain one of these mean chest (they
-- cover the node's intake.chest_body_parts: CHEST, CHEST_PA, PORT CHEST, THORAX, ...).
local CHEST_WORDS = { 'CHEST', 'THORAX', 'TORAX', 'LUNG' }

local function trim(value)
   return (string.gsub(value or '', '^%s*(.-)%s*$', '%1'))
end

local function names_chest(bodyPart)
   local part = string.upper(trim(bodyPart))
   if part == '' then
      return true  -- absent: the node looks at the codes and descriptions
   end
   for _, word in ipairs(CHEST_WORDS) do
      if string.find(part, word, 1, true) then
         return true
      end
   end
   return false
end

-- The calling AE title of the association that brought the instance.
local function sender(metadata, origin)
   if origin ~= nil and origin['RemoteAet'] ~= nil then
      return trim(origin['RemoteAet'])
   end
   return trim(metadata['RemoteAET'])
end

function OnStoredInstance(instanceId, tags, metadata, origin)
   if sender(metadata, origin) == NODE_CALLING_AE then
      return
   end
   local modality = string.upper(trim(tags['Modality']))
   if not MODALITIES[modality] or not names_chest(tags['BodyPartExamined']) then
      return
   end
   -- Orthanc's identifier of the instance (a hash), never a patient's data, in the log.
   local sent, err = pcall(SendToModality, instanceId, NODE)
   if sent then
      print('autoroute: sent ' .. instanceId .. ' to ' .. NODE)
   else
      print('autoroute: FAILED to send ' .. instanceId .. ' to ' .. NODE .. ': '
            .. tostring(err))
   end
end
