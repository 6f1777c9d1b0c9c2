{{/* Name of the chart, overridable. */}}
{{- define "forge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name appended unless it already contains it. */}}
{{- define "forge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "forge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "forge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "forge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "forge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: forge
{{- end }}

{{- define "forge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "forge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest when a digest is given, else repository:tag. */}}
{{- define "forge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "forge.peeringName" -}}
{{- default .Release.Name .Values.peering.name }}
{{- end }}

{{/*
What the operator does in a namespace it watches, and nothing more. The same
rules go into the ClusterRole (cluster-wide mode) or into one Role per watched
namespace. The trainer's Role the operator creates (pods get/patch) is a
subset of these, as RBAC's escalation check requires.
*/}}
{{- define "forge.namespacedRules" -}}
# the Forge resources: read them, write only their status; a training with spec.evaluation makes its ForgeEval
- apiGroups: ["forge.dev"]
  resources: ["forgetrainings"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["forge.dev"]
  resources: ["forgeevals"]
  verbs: ["create", "get", "list", "watch", "patch"]
- apiGroups: ["forge.dev"]
  resources: ["forgetrainings/status", "forgeevals/status"]
  verbs: ["update", "patch"]
# the children's owner references set blockOwnerDeletion: where the API server enforces it
# (OwnerReferencesPermissionEnforcement, e.g. OpenShift) that needs update on the owner's finalizers.
- apiGroups: ["forge.dev"]
  resources: ["forgetrainings/finalizers", "forgeevals/finalizers"]
  verbs: ["update"]
# the children of a training (server-side apply: create + patch)
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "services", "serviceaccounts"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
# the NetworkPolicy of network.egress Restricted (deleted when the spec turns Unrestricted); watched, as the
# other children, so that an unchanged one is not applied again
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
# worker pods: watched for failures, force-deleted when stuck on a lost node
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# why workers or a queued training wait: the claims of unschedulable workers, the LocalQueue of
# scheduling.queueName (read only)
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["localqueues"]
  verbs: ["get"]
# events: posted on the trainings; a Job's FailedCreate events read while it lacks pods
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list"]
{{- end }}

{{- define "forge.peeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ . | quote }}]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}

{{- define "forge.nodeRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* Refuse combinations that cannot work, at template time. */}}
{{- define "forge.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.peering.enabled) }}
{{- fail "replicas > 1 needs peering.enabled=true: replicas without peering would all reconcile the same trainings" }}
{{- end }}
{{- end }}
